"""Bad input through the CLI, one table: every row is a class of input the user can get
wrong, run through `kedit ...` (in-process `pipelines.cli.main`, or a real subprocess for the
rows marked so, which proves that no traceback reaches stderr). Each must exit 2 with ONE line
on stderr naming the file / record / field, and leave every file already written (a finished
run directory with checkpoints, its run.json, the MLflow store, the statistics cache) with the
same bytes and mtime.

Real parts only: a real finished `kedit edit` run (tiny-random-llama, MEMIT, 2 edits, no Ray)
is the "earlier output"; a read-only file system and a full disk are real tmpfs mounts
(root only; without root the read-only row uses a directory without write permission and
the full-disk row is skipped).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
# stderr lines that are not messages: log records (CLI format) and tqdm progress bars
# (transformers' "Loading weights"); everything else on stderr counts.
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) \S+: ")
PROGRESS = re.compile(r"^[^|]*\d+%\|.*\| *[\d.]+[kMG]?/[\d.]+[kMG]? \[")
TINY = "tiny-random-llama"
# Hyper-parameters that keep the tiny model's statistics small (the base run's, so the cached
# statistics of the base run are reused where a row needs them).
TINY_SET = ["--set", "layers=1,2", "--set", "mom2_n_samples=50"]

ROME = {"case_id": 7, "requested_rewrite": {
    "prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
    "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["Tourists visit The Eiffel Tower in"],
    "neighborhood_prompts": ["The Louvre is located in the city of"]}
FLAT = {"case_id": 1, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
        "subject": "Danielle Darrieux", "ground_truth": "French",
        "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}


def corpus_text() -> str:
    cities = ["Paris", "Rome", "Tokyo", "Berlin", "Madrid", "Lisbon", "Vienna", "Oslo"]
    return "".join(f"The city of {c} lies on a river, and its museum {i} opens at {i % 12 + 1} o'clock.\n"
                   for i in range(60) for c in cities[i % 8:i % 8 + 1])


def env_for(cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), KEDIT_CACHE=str(cache), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished 2-edit run (the earlier output every row must leave alone): base/runs/run
    (run.json, checkpoints, metrics), base/runs/mlflow.db, base/cache/stats, base/corpus.txt."""
    d = tmp_path_factory.mktemp("base")
    (d / "corpus.txt").write_text(corpus_text())
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "edit", "--model", TINY, "--method", "memit",
                        "--limit", "2", "--batch-size", "1", "--workers", "0", "--out", str(d / "runs" / "run"),
                        *TINY_SET, "--stats-corpus", str(d / "corpus.txt"), "--perplexity-texts", "0",
                        "--eval-every", "0"],
                       cwd=ROOT, env=env_for(d / "cache"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / "runs" / "run" / "run.json").is_file() and (d / "runs" / "run" / "metrics.json").is_file()
    assert list((d / "cache" / "stats").glob("mom2-*.safetensors"))
    return d


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file() or p.name.endswith(".lock"):
                continue   # lock files (run directory, statistics entries) record their holder; not output
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---------------------------------------------------------------------------- mounts
def _mount(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for p in reversed(made):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


# ---------------------------------------------------------------------------- inputs
def write_json(ws: Path, name: str, obj) -> Path:
    p = ws / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


def write_text(ws: Path, name: str, text: str) -> Path:
    p = ws / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def save_tiny(dest: Path, perturb: bool = False) -> Path:
    """tiny-random-llama saved as an ordinary transformers directory."""
    import torch

    from kedit_core.models import load

    lm = load(TINY, device="cpu")
    if perturb:  # another model: same architecture, other weights
        with torch.no_grad():
            next(lm.model.parameters()).add_(0.01)
    lm.model.save_pretrained(dest, safe_serialization=True)
    lm.tokenizer.save_pretrained(dest)
    return dest


def run_dir(ws: Path) -> Path:
    return ws / "runs" / "run"


def edit_local(ws: Path, *more: str, out: str = "out") -> list[str]:
    return ["edit-local", "--model", TINY, "--method", "memit", "--device", "cpu", "--out", str(ws / out),
            "--perplexity-texts", "0", "--stats-corpus", str(ws / "corpus.txt"), *TINY_SET, *more]


def edit(ws: Path, *more: str, out: str | None = "runs/new") -> list[str]:
    o = ["--out", str(ws / out)] if out else []
    return ["edit", "--model", TINY, "--method", "memit", "--workers", "0", "--device", "cpu", *o,
            "--perplexity-texts", "0", "--stats-corpus", str(ws / "corpus.txt"), *TINY_SET, *more]


# Each setup gets (ws, mounts) and returns (argv, substrings the error line must hold).
Setup = Callable[[Path, list], tuple[list[str], list[str]]]


@dataclass
class Case:
    id: str
    setup: Setup
    subprocess: bool = False


def c_non_utf8(ws, m):
    p = ws / "in" / "latin1.json"
    p.parent.mkdir(parents=True)
    p.write_bytes(json.dumps([FLAT]).replace("Danielle", "Dani\\u00e9lle").encode().replace(
        b"\\u00e9", "\u00e9".encode("latin-1")).replace(b"\n", b"") + b"\n")
    return edit_local(ws, "--data", str(p)), [str(p), "not UTF-8", "byte offset", "line 1"]


def c_non_utf8_jsonl(ws, m):
    p = ws / "in" / "cp1252.jsonl"
    p.parent.mkdir(parents=True)
    p.write_bytes(json.dumps(FLAT).encode() + b"\n" + json.dumps(FLAT).encode().replace(b"French", b"Fran\xe7ais")
                  + b"\n")
    return edit(ws, "--data", str(p)), [str(p), "byte 0xe7", "line 2"]


def c_truncated_run_json_resume(ws, m):
    rj = run_dir(ws) / "run.json"
    text = rj.read_text()
    rj.write_text(text[: len(text) // 2])
    return ["edit", "--resume", str(run_dir(ws)), "--workers", "0"], [str(rj), "truncated"]


def c_run_json_no_config_resume(ws, m):
    rj = run_dir(ws) / "run.json"
    rec = json.loads(rj.read_text())
    del rec["config"]
    rj.write_text(json.dumps(rec))
    return ["edit", "--resume", str(run_dir(ws)), "--workers", "0"], [str(rj), "field 'config'"]


def c_run_json_foreign_key_resume(ws, m):
    rj = run_dir(ws) / "run.json"
    rec = json.loads(rj.read_text())
    rec["config"]["no_such_option"] = 1
    rj.write_text(json.dumps(rec))
    return ["edit", "--resume", str(run_dir(ws)), "--workers", "0"], [str(rj), "field 'config.no_such_option'"]


def c_corrupt_run_json_export(ws, m):
    rj = run_dir(ws) / "run.json"
    rj.write_bytes(b"\x00\x13garbage{")
    return ["export", str(run_dir(ws)), "--to", str(ws / "exported")], [str(rj), "corrupt"]


def c_truncated_run_json_export(ws, m):
    rj = run_dir(ws) / "run.json"
    rj.write_text(rj.read_text()[:40])
    return ["export", str(run_dir(ws)), "--to", str(ws / "exported")], [str(rj), "truncated"]


def c_export_no_run_json(ws, m):
    (ws / "empty").mkdir()
    return ["export", str(ws / "empty"), "--to", str(ws / "exported")], [str(ws / "empty" / "run.json")]


def c_stats_workers_0(ws, m):
    return ["stats", "--model", TINY, "--device", "cpu", "--workers", "0", "--corpus", str(ws / "corpus.txt")], \
        ["field 'workers'", "at least 1"]


def c_edit_negative_limit(ws, m):
    return edit(ws, "--limit", "-1"), ["field 'limit'", "0 or more"]


def c_edit_local_negative_limit(ws, m):
    return edit_local(ws, "--limit", "-3"), ["field 'limit'", "0 or more"]


def c_set_layers_empty(ws, m):
    return edit_local(ws, "--limit", "1", "--set", "layers="), ["field 'layers'", "must not be empty"]


def c_edit_set_layers_empty(ws, m):
    return edit(ws, "--limit", "1", "--set", "layers="), ["field 'layers'", "must not be empty"]


def c_yaml_negative_zopt_chunk(ws, m):
    y = write_text(ws, "job.yaml", "model: tiny-random-llama\nmethod: memit\nzopt_chunk: -4\n")
    return ["edit", "--config", str(y), "--workers", "0", "--out", str(ws / "runs" / "new")], \
        [str(y), "field 'zopt_chunk'", "0 or more"]


def c_negative_eval_every(ws, m):
    return edit(ws, "--eval-every", "-1"), ["field 'eval_every'"]


def c_negative_perplexity_texts(ws, m):
    return edit_local(ws, "--perplexity-texts", "-5"), ["field 'perplexity_texts'"]


def c_zero_batch_size(ws, m):
    return edit(ws, "--batch-size", "0"), ["field 'batch_size'", "at least 1"]


def c_corpus_blank_and_headings(ws, m):
    p = write_text(ws, "blank.txt", "\n\n = Heading = \n\n = = Sub heading = = \n   \n")
    argv = edit(ws, "--limit", "1")
    argv[argv.index("--stats-corpus") + 1] = str(p)
    return argv, [str(p), "field 'stats_corpus'", "no usable text"]


def c_corpus_one_token_texts(ws, m):
    p = write_text(ws, "short.txt", "a\n\nb\n = H = \nc\n")
    argv = edit_local(ws, "--limit", "1")
    argv[argv.index("--stats-corpus") + 1] = str(p)
    return argv, [str(p), "field 'stats_corpus'", "no usable text"]


def c_stats_command_one_token_corpus(ws, m):
    p = write_text(ws, "short.txt", "x\ny\n\n = Heading = \n")
    return ["stats", "--model", TINY, "--device", "cpu", "--layers", "1,2", "--corpus", str(p)], \
        [str(p), "field 'stats_corpus'", "no usable text"]


def c_stats_corpus_missing(ws, m):
    return ["stats", "--model", TINY, "--corpus", str(ws / "nope.txt")], [str(ws / "nope.txt"), "field 'stats_corpus'"]


def c_unknown_model_type(ws, m):
    d = ws / "in" / "weird-model"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 8}))
    return ["generate", "--model", str(d), "--device", "cpu", "hi"], [str(d / "config.json"), "field 'model'"]


def c_garbage_safetensors(ws, m):
    d = save_tiny(ws / "in" / "broken-model")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + os.urandom(64))
    return ["generate", "--model", str(d), "--device", "cpu", "hi"], [str(d / "model.safetensors"), "field 'model'"]


def c_unknown_model(ws, m):
    return ["generate", "--model", "no/such-model-anywhere", "hi"], ["unknown model 'no/such-model-anywhere'"]


def c_cuda0_without_cuda(ws, m):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: cuda:0 is a valid device here (the cuda:99 row covers it)")
    return ["generate", "--model", TINY, "--device", "cuda:0", "hi"], ["field 'device'", "'cuda:0'"]


def c_cuda_beyond_count(ws, m):
    return edit_local(ws, "--device", "cuda:99"), ["field 'device'", "'cuda:99'"]


def c_bad_device_name(ws, m):
    return ["generate", "--model", TINY, "--device", "gpu1", "hi"], ["field 'device'", "unknown device 'gpu1'"]


def c_evoke_alias_types(ws, m):
    rec = dict(ROME, prefix_distraction=["The Eiffel Tower is in Rome. The Louvre is in"],
               relation_specificity={"prompt": "The Eiffel Tower was designed by",
                                     "answer": {"value": "Gustave Eiffel", "aliases": [1, 2]}})
    p = write_json(ws, "evoke.json", [rec])
    return edit_local(ws, "--data", str(p)), [str(p), "record 0", "field 'relation_specificity.answer.aliases[0]'",
                                              "expected str, got int"]


def c_evoke_answer_value_type(ws, m):
    rec = dict(ROME, relation_specificity={"prompt": "The Eiffel Tower was designed by",
                                           "answer": {"value": ["Gustave"], "aliases": []}})
    p = write_json(ws, "evoke.json", [rec, dict(rec, case_id=8)])
    return edit(ws, "--data", str(p)), [str(p), "record 0", "field 'relation_specificity.answer.value'"]


def _dups(ws):
    return write_json(ws, "dups.json", [ROME, dict(ROME, neighborhood_prompts=["The Louvre is in"])])


def c_dup_ids_strict_edit_local(ws, m):
    p = _dups(ws)
    return edit_local(ws, "--data", str(p), "--strict"), [str(p), "record 1", "field 'case_id'", "duplicate case id '7'"]


def c_dup_ids_strict_edit(ws, m):
    p = _dups(ws)
    return edit(ws, "--data", str(p), "--strict"), [str(p), "record 1", "field 'case_id'", "duplicate"]


def c_dup_ids_strict_inspect(ws, m):
    p = _dups(ws)
    return ["data", "inspect", str(p), "--strict"], [str(p), "record 1", "field 'case_id'", "first at record 0"]


def c_resume_other_config(ws, m):
    y = write_text(ws, "other.yaml", "model: tiny-random-llama\nmethod: rome\nbatch_size: 1\n")
    return ["edit", "--resume", str(run_dir(ws)), "--config", str(y), "--workers", "0"], \
        [str(y), "field 'method'", "'memit'", "'rome'"]


def c_yaml_not_mapping(ws, m):
    y = write_text(ws, "list.yaml", "- model: tiny-random-llama\n- method: rome\n")
    return ["edit", "--config", str(y)], [str(y), "mapping"]


def c_yaml_unknown_key(ws, m):
    y = write_text(ws, "typo.yaml", "modle: tiny-random-llama\n")
    return ["edit", "--config", str(y)], [str(y), "field 'modle'", "unknown option"]


def c_yaml_bad_type(ws, m):
    y = write_text(ws, "types.yaml", "batch_size: ten\n")
    return ["edit", "--config", str(y)], [str(y), "field 'batch_size'"]


def c_yaml_invalid(ws, m):
    y = write_text(ws, "broken.yaml", "model: [unclosed\n")
    return ["edit", "--config", str(y)], [str(y), "not valid YAML"]


def c_stats_of_another_model(ws, m):
    """The base run's statistics file renamed to the name the other model's entry would have:
    its header names the tiny model's hash, so it is refused, naming the file."""
    from kedit_core.methods import get_method, make_config
    from kedit_core.models import load
    from kedit_core.stats import StatsStore, open_corpus

    d = save_tiny(ws / "in" / "other-model", perturb=True)
    lm = load(str(d), device="cpu")
    method = get_method("memit")
    cfg = make_config(method.config_cls, lm, {"layers": "1,2", "mom2_n_samples": "50"})
    sites = [k.site for k in method.required_stats(cfg, lm)]
    store = StatsStore(ws / "cache" / "stats")
    specs = store.specs(lm, sites, open_corpus(str(ws / "corpus.txt")), n_samples=50,
                        max_length=cfg.mom2_max_length)
    ours = sorted(store.root.glob("mom2-*.safetensors"))
    for spec, src in zip(specs.values(), ours):
        assert not store.path(spec).exists()
        shutil.copy2(src, store.path(spec))
    target = store.path(specs[sites[0]])
    argv = edit_local(ws, "--limit", "1")
    argv[argv.index("--model") + 1] = str(d)
    return argv, [str(target), "does not match its name", "model_hash"]


def c_out_under_a_file(ws, m):
    f = write_text(ws, "afile", "I am a file\n")
    return edit_local(ws, out="in/afile/sub"), [str(f / "sub"), "not a directory"]


def c_edit_out_is_a_file(ws, m):
    f = write_text(ws, "afile", "I am a file\n")
    return edit(ws, out="in/afile"), [str(f), "not a directory"]


def c_export_to_under_a_file(ws, m):
    f = write_text(ws, "afile", "I am a file\n")
    return ["export", str(run_dir(ws)), "--to", str(f / "x")], [str(f / "x"), "field 'to'", "not a directory"]


def _read_only_copy(ws, m) -> Path:
    """A real read-only directory holding a copy of the finished run: a tmpfs remounted
    read-only (root), or, without root, a directory without write permission."""
    ro = ws / "ro"
    if _mount(ro, "size=16m"):
        m.append(ro)
        shutil.copytree(run_dir(ws), ro / "run")
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    else:
        shutil.copytree(run_dir(ws), ro / "run")
        for p in [ro / "run", *(ro / "run").rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
    with pytest.raises(OSError):  # really refused by the operating system
        (ro / "run" / "probe").write_text("x")
    return ro / "run"


def c_read_only_run_dir_resume(ws, m):
    rd = _read_only_copy(ws, m)
    return ["edit", "--resume", str(rd), "--workers", "0"], [str(rd), "field 'out'", "not writable"]


def c_read_only_export_target(ws, m):
    rd = _read_only_copy(ws, m)
    return ["export", str(run_dir(ws)), "--to", str(rd / "exported")], [str(rd / "exported"), "not writable"]


def c_read_only_statistics_cache(ws, m):
    """A real failing write reaching the CLI as OSError: the statistics cache ($KEDIT_CACHE) on
    a read-only file system, found only when the new statistics are saved."""
    cache = ws / "rocache"
    if not _mount(cache, "size=1m,ro"):
        pytest.skip("a read-only file system is a tmpfs mounted read-only, which needs root and mount")
    m.append(cache)
    os.environ["KEDIT_CACHE"] = str(cache)  # restored by monkeypatch (the test set it first)
    return edit_local(ws, "--limit", "1"), [str(cache / "stats"), "Read-only file system"]


def c_read_only_statistics_dir(ws, m):
    """As above with the statistics directory present (read-only): the refused write (the
    entry's lock file, created before computing) is named with its path."""
    cache = ws / "rocache"
    if not _mount(cache, "size=4m"):
        pytest.skip("a read-only file system is a tmpfs mounted read-only, which needs root and mount")
    m.append(cache)
    shutil.copytree(ws / "cache" / "stats", cache / "stats")
    r = subprocess.run(["mount", "-o", "remount,ro", str(cache)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    os.environ["KEDIT_CACHE"] = str(cache)  # restored by monkeypatch (the test set it first)
    p = write_text(ws, "corpus2.txt", corpus_text().replace("river", "lake"))  # statistics not cached
    argv = edit_local(ws, "--limit", "1")
    argv[argv.index("--stats-corpus") + 1] = str(p)
    # the first write refused is the entry's lock file (or the entry itself): both under stats/
    return argv, [str(cache / "stats") + "/", "Read-only file system"]


def c_full_disk_export(ws, m):
    full = ws / "full"
    if not _mount(full, "size=64k"):
        pytest.skip("a full disk is simulated by a small tmpfs, which needs root and mount")
    m.append(full)
    with open(full / "filler", "wb", buffering=0) as fh:  # fill it: the next write gets ENOSPC
        with pytest.raises(OSError) as e:
            while True:
                fh.write(b"\0" * 4096)
        assert e.value.errno == 28
    return ["export", str(run_dir(ws)), "--to", str(full / "exported"), "--deltas-only"], \
        [str(full / "exported"), "field 'to'", "cannot write the export"]


def c_unknown_method(ws, m):
    argv = edit_local(ws, "--limit", "1")
    argv[argv.index("--method") + 1] = "nosuch"
    return argv, ["field 'method'", "unknown method 'nosuch'"]


def c_unknown_hparam(ws, m):
    return edit_local(ws, "--limit", "1", "--set", "no_such_hp=1"), ["field 'no_such_hp'", "unknown hyper-parameter"]


def c_hparam_bad_type(ws, m):
    return edit_local(ws, "--limit", "1", "--set", "v_lr=fast"), ["field 'v_lr'", "'fast'"]


def c_set_without_equals(ws, m):
    return edit(ws, "--set", "layers"), ["field '--set'", "NAME=VALUE"]


def c_layers_out_of_range(ws, m):
    return edit_local(ws, "--limit", "1", "--set", "layers=1,99"), ["field 'layers'", "out of range"]


def c_record_missing_field(ws, m):
    rec = dict(FLAT)
    del rec["subject"]
    p = write_json(ws, "flat.json", [FLAT, rec])
    return edit_local(ws, "--data", str(p)), [str(p), "record 1", "field 'subject'", "missing"]


def c_record_bad_type(ws, m):
    p = write_json(ws, "flat.json", [dict(FLAT, target_new=5)])
    return edit(ws, "--data", str(p)), [str(p), "record 0", "field 'target_new'", "expected str"]


def c_data_missing(ws, m):
    return edit_local(ws, "--data", str(ws / "in" / "absent.json")), [str(ws / "in" / "absent.json"), "no such file"]


def c_data_invalid_json(ws, m):
    p = write_text(ws, "broken.json", '[{"prompt": ')
    return edit(ws, "--data", str(p)), [str(p), "not valid JSON"]


def c_data_unknown_format(ws, m):
    p = write_json(ws, "foo.json", [{"foo": 1}])
    return edit_local(ws, "--data", str(p)), [str(p), "unrecognised edit-data format"]


CASES = [
    # the classes of kedit issue 9, point 5
    Case("non-utf8-data-file", c_non_utf8, subprocess=True),
    Case("non-utf8-jsonl-line-2", c_non_utf8_jsonl),
    Case("truncated-run-json-resume", c_truncated_run_json_resume, subprocess=True),
    Case("run-json-without-config-resume", c_run_json_no_config_resume),
    Case("run-json-unknown-option-resume", c_run_json_foreign_key_resume),
    Case("corrupt-run-json-export", c_corrupt_run_json_export),
    Case("truncated-run-json-export", c_truncated_run_json_export, subprocess=True),
    Case("stats-workers-0", c_stats_workers_0, subprocess=True),
    Case("edit-negative-limit", c_edit_negative_limit),
    Case("edit-local-negative-limit", c_edit_local_negative_limit),
    Case("set-layers-empty", c_set_layers_empty),
    Case("edit-set-layers-empty", c_edit_set_layers_empty),
    Case("yaml-negative-zopt-chunk", c_yaml_negative_zopt_chunk),
    Case("negative-eval-every", c_negative_eval_every),
    Case("negative-perplexity-texts", c_negative_perplexity_texts),
    Case("corpus-only-blank-lines-and-headings", c_corpus_blank_and_headings),
    Case("corpus-only-one-token-texts", c_corpus_one_token_texts),
    Case("stats-command-one-token-corpus", c_stats_command_one_token_corpus, subprocess=True),
    Case("unknown-model-type-in-config-json", c_unknown_model_type),
    Case("garbage-model-safetensors", c_garbage_safetensors, subprocess=True),
    Case("cuda0-without-cuda", c_cuda0_without_cuda),
    Case("cuda-beyond-device-count", c_cuda_beyond_count),
    Case("evoke-non-string-aliases", c_evoke_alias_types),
    Case("evoke-non-string-answer-value", c_evoke_answer_value_type),
    Case("duplicate-ids-strict-edit-local", c_dup_ids_strict_edit_local),
    Case("duplicate-ids-strict-edit", c_dup_ids_strict_edit),
    Case("duplicate-ids-strict-data-inspect", c_dup_ids_strict_inspect),
    Case("resume-with-other-config", c_resume_other_config),
    Case("yaml-not-a-mapping", c_yaml_not_mapping),
    Case("statistics-file-of-another-model", c_stats_of_another_model),
    Case("out-under-a-file", c_out_under_a_file, subprocess=True),
    Case("edit-out-is-a-file", c_edit_out_is_a_file),
    Case("export-to-under-a-file", c_export_to_under_a_file),
    Case("read-only-run-dir-resume", c_read_only_run_dir_resume),
    Case("read-only-export-target", c_read_only_export_target),
    Case("read-only-statistics-cache", c_read_only_statistics_cache),
    Case("read-only-statistics-dir", c_read_only_statistics_dir),
    Case("full-disk-export", c_full_disk_export),
    # classes covered before (tests/test_cli.py, tests/test_readers.py), kept in the table
    Case("unknown-method", c_unknown_method),
    Case("unknown-hyper-parameter", c_unknown_hparam),
    Case("hyper-parameter-bad-type", c_hparam_bad_type),
    Case("set-without-equals", c_set_without_equals),
    Case("layers-out-of-range", c_layers_out_of_range),
    Case("record-missing-field", c_record_missing_field),
    Case("record-bad-type", c_record_bad_type),
    Case("data-file-missing", c_data_missing),
    Case("data-invalid-json", c_data_invalid_json),
    Case("data-unknown-format", c_data_unknown_format),
    Case("unknown-model", c_unknown_model, subprocess=True),
    Case("bad-device-name", c_bad_device_name),
    Case("zero-batch-size", c_zero_batch_size),
    Case("yaml-unknown-key", c_yaml_unknown_key),
    Case("yaml-bad-type", c_yaml_bad_type),
    Case("yaml-invalid", c_yaml_invalid),
    Case("stats-corpus-missing", c_stats_corpus_missing),
    Case("export-without-run-json", c_export_no_run_json),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path, monkeypatch, capsys, mounts):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    monkeypatch.setenv("KEDIT_CACHE", str(ws / "cache"))
    argv, expect = case.setup(ws, mounts)
    capsys.readouterr()  # what the set-up printed is not the command's
    before = snapshot(ws)
    assert len(before) > 5  # the run, its checkpoints, the MLflow store, the statistics

    if case.subprocess:
        r = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, env=env_for(ws / "cache"),
                           capture_output=True, text=True, timeout=300)
        code, err = r.returncode, r.stderr
    else:
        code = main(argv)
        err = capsys.readouterr().err

    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip() and not LOG_LINE.match(l) and not PROGRESS.match(l)]
    assert code == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("kedit: error: "), line
    for s in expect:
        assert s in line, f"{s!r} not in {line!r}"

    after = snapshot(ws)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"earlier output changed or removed: {changed}"
    assert sorted(set(after) - set(before)) == [], "files written by a refused command"


def test_table_is_large_enough():
    assert len(CASES) >= 20 and sum(c.subprocess for c in CASES) >= 3


def test_duplicate_ids_are_a_warning_by_default(tmp_path, capsys):
    from kedit_core.data import load_requests, read_dataset

    p = _dups(tmp_path)
    ds = read_dataset(p)
    assert len(ds.cases) == 2 and len(ds.warnings) == 1 and not ds.problems
    assert "record 1" in ds.warnings[0] and "field 'case_id'" in ds.warnings[0]
    assert len(load_requests(p)) == 2
    assert main(["data", "inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "warnings: 1 duplicate case id" in out and "problems: none" in out


def test_edit_workers_0_stays_valid():
    """`kedit edit --workers 0` (edit in the driver, no Ray actors) is documented and valid;
    only `kedit stats --workers 0` is refused."""
    from pipelines.config import build

    assert build(None, workers=0, out="x").workers == 0


def test_resume_with_the_same_config_is_accepted(base, tmp_path, monkeypatch, capsys):
    """--config with --resume is allowed when its identity fields match the saved run; the
    finished run is left as it was."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    monkeypatch.setenv("KEDIT_CACHE", str(ws / "cache"))
    y = write_text(ws, "same.yaml", "model: tiny-random-llama\nmethod: memit\nworkers: 0\n")
    ckpts = sorted(p.name for p in (run_dir(ws) / "checkpoints").iterdir())
    metrics = (run_dir(ws) / "metrics.json").read_text()
    assert main(["edit", "--resume", str(run_dir(ws)), "--config", str(y)]) == 0
    assert sorted(p.name for p in (run_dir(ws) / "checkpoints").iterdir()) == ckpts
    assert json.loads((run_dir(ws) / "metrics.json").read_text())["n_edits"] == json.loads(metrics)["n_edits"] == 2
