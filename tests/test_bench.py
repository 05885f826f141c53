"""`kedit bench` (issue 12 point 4): cells are edit streams, the report has one table per
benchmark family (CounterFact and EVOKE here) with CSV and PNG, a finished cell is never
recomputed, the MLflow parent run has a child run per cell; on Ray, a bench killed with -9
resumes cell by cell."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main as cli
from tests.test_evoke import MAIN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "corpus.txt").write_text("\n".join(["Paris is the capital of France.", "Edits change facts in models."] * 30))
    recs = [dict(MAIN, case_id=i) for i in range(2)]
    recs[1]["requested_rewrite"] = dict(MAIN["requested_rewrite"], subject="Max Mosley")
    (d / "evoke.json").write_text(json.dumps(recs))
    return d


def argv(out, files, *extra, methods="ft-m,memit", limit=4):
    return ["bench", "--model", "tiny-random-llama", "--device", "cpu", "--methods", methods,
            "--data", f"builtin,{files / 'evoke.json'}", "--limit", str(limit), "--batch-size", "2", "--perplexity-texts", "0",
            "--stats-corpus", str(files / "corpus.txt"), "--set", "ft-m.layers=1", "--set", "ft-m.num_steps=2",
            "--set", "memit.layers=0,1", "--set", "memit.mom2_n_samples=40", "--set", "memit.v_num_grad_steps=2",
            "--out", str(out), *extra]


def test_bench_in_process_report_resume_and_mlflow(files, tmp_path):
    out = tmp_path / "b"
    assert cli(argv(out, files, "--no-ray")) == 0
    for f in ("report.md", "report.csv", "report.png", "bench.json"):
        assert (out / f).is_file()
    md = (out / "report.md").read_text()
    assert "## counterfact" in md and "## evoke" in md and "| ES | PS | NS | Score |" in md
    import csv

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"ft-m", "memit"}
    evoke = [r for r in rows if r["family"] == "evoke"]
    assert all(r["bench/multihop_EOS"] != "" for r in evoke)
    # the unedited model's benchmark metrics: in each cell's first row and in the report
    pre = json.loads((out / "cells" / "memit__evoke" / "metrics.json").read_text())["pre"]
    assert 0.0 <= pre["bench/multihop_EOS"] <= 1.0 and "bench/efficacy_AMS" in pre
    assert md.count("| (unedited) |") == 2
    # cells sharing this process each report their own peak (reset at the start of each cell)
    for c in ("memit__builtin", "ft-m__evoke"):
        cell = json.loads((out / "cells" / c / "bench_cell.json").read_text())
        assert cell["peak_rss_scope"] == "cell" and cell["peak_rss_mb"] > 0
    assert "(process)" not in md
    assert "after 2 edits" in (out / "cells" / "memit__evoke" / "cell.log").read_text()
    # a finished cell is read back, not recomputed
    cell = out / "cells" / "memit__builtin" / "metrics.json"
    before = cell.stat().st_mtime_ns
    assert cli(argv(out, files, "--no-ray")) == 0
    assert cell.stat().st_mtime_ns == before
    # MLflow: the parent run and one child run per cell
    from mlflow.tracking import MlflowClient

    rec = json.loads((out / "mlflow.json").read_text())
    client = MlflowClient(rec["uri"])
    children = client.search_runs([rec["experiment_id"]], f"tags.mlflow.parentRunId = '{rec['run_id']}'")
    assert len(children) == 4
    # another bench in the same directory is refused
    assert cli(argv(out, files, "--no-ray", "--limit", "2")) == 2


def test_bench_directory_grows_by_variants_and_datasets(files, tmp_path):
    """A variant (METHOD@LABEL) runs the base method with its own --set on top of the base's;
    a later run in the same directory adds cells, keeps the finished ones, and reports all."""
    out = tmp_path / "grow"
    common = ["--model", "tiny-random-llama", "--device", "cpu", "--limit", "2", "--batch-size", "2",
              "--perplexity-texts", "0", "--no-ray", "--set", "ft-m.layers=1", "--set", "ft-m.num_steps=2", "--out", str(out)]
    assert cli(["bench", "--methods", "ft-m", "--data", "builtin", *common]) == 0
    first = out / "cells" / "ft-m__builtin" / "metrics.json"
    stamp = first.stat().st_mtime_ns
    assert cli(["bench", "--methods", "ft-m,ft-m@long", "--data", f"builtin,{files / 'evoke.json'}",
                "--set", "ft-m@long.num_steps=6", *common]) == 0
    assert first.stat().st_mtime_ns == stamp                     # finished cell read back
    cells = json.loads((out / "bench.json").read_text())["cells"]
    assert set(cells) == {"ft-m__builtin", "ft-m@long__builtin", "ft-m__evoke", "ft-m@long__evoke"}
    # the variant is ft-m with the base's layers and its own step count
    run = json.loads((out / "cells" / "ft-m@long__builtin" / "metrics.json").read_text())
    assert run["hparams"]["num_steps"] == 6 and list(run["hparams"]["layers"]) == [1]
    assert json.loads(first.read_text())["hparams"]["num_steps"] == 2
    # a third run asking for one dataset only still reports every cell of the directory
    assert cli(["bench", "--methods", "ft-m", "--data", "builtin", *common]) == 0
    md = (out / "report.md").read_text()
    assert md.count("| ft-m@long |") == 2 and md.count("| ft-m |") == 2 and "`ft-m@long` = ft-m with" in md
    # the same cell with other hyper-parameters is refused, nothing is touched
    before = (out / "bench.json").read_text()
    assert cli(["bench", "--methods", "ft-m@long", "--data", "builtin", "--set", "ft-m@long.num_steps=7", *common]) == 2
    assert (out / "bench.json").read_text() == before
    assert cli(["bench", "--methods", "nosuch@x", "--data", "builtin", *common]) == 2
    # --report-only rewrites the report from the cells, running nothing
    import csv

    (out / "report.md").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/metrics.json")}
    assert cli(["bench", "--report-only", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == md
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/metrics.json")} == stamps
    # the CSV's seconds_per_edit is the cell's (the stream mean); the end point's own (its
    # last batch's) has its own column
    cell = json.loads((out / "cells" / "ft-m@long__evoke" / "bench_cell.json").read_text())
    row = next(r for r in csv.DictReader((out / "report.csv").open()) if r["method"] == "ft-m@long"
               and r["family"] == "evoke")
    assert float(row["seconds_per_edit"]) == pytest.approx(cell["seconds_per_edit"])
    assert float(row["last_batch/seconds_per_edit"]) == pytest.approx(cell["post"]["seconds_per_edit"])
    assert cli(["bench", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert cli(["bench", "--data", "builtin", *common]) == 2              # --methods missing


@pytest.mark.slow
def test_bench_on_ray_resumes_cell_by_cell_after_sigkill(files, tmp_path):
    out = tmp_path / "ray"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cheap = dict(methods="ft-m", limit=2)           # two cells: the point is the kill and the resume
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv(out, files, "--cpus-per-cell", "2", **cheap)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    first = None
    while time.time() < deadline:
        done = sorted(p.parent.name for p in (out / "cells").glob("*/bench_cell.json")) if (out / "cells").is_dir() else []
        if done:
            first = done[0]
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)          # the driver and its Ray processes
    proc.wait()
    assert first is not None, "no cell finished in time"
    stamp = (out / "cells" / first / "metrics.json").stat().st_mtime_ns
    assert not (out / "report.md").exists()
    try:
        assert cli(argv(out, files, "--cpus-per-cell", "2", **cheap)) == 0
    finally:
        import ray

        ray.shutdown()
    assert (out / "cells" / first / "metrics.json").stat().st_mtime_ns == stamp      # not recomputed
    assert len(list((out / "cells").glob("*/bench_cell.json"))) == 2 and (out / "report.png").is_file()


def test_bench_stream_report_keeps_a_stream_whose_run_directory_is_gone(tmp_path, monkeypatch):
    """A stream reported before whose run directory was lost (a new machine) keeps its rows
    and its place in the plot when the report is rewritten for another method; a restarted
    run that is behind does not replace them."""
    import benchmarks.bench_stream as bs

    monkeypatch.setattr(bs, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    data = tmp_path / "cf.json"
    data.write_text("[]")
    groups = lambda e, es: {"edits": e, "retention/efficacy_score": es, "perplexity": 40.0 + e / 100,
                            "all/efficacy_score": 0.3}
    rows = [{"method": "memit", "edits": e, "s_per_edit": 9.0, "retention_ES": es, "groups": groups(e, es)}
            for e, es in ((0, None), (200, 0.98), (400, 0.95))]
    name = "stream_m_400x100"
    (tmp_path / "results" / f"{name}.json").write_text(json.dumps(
        {"machine": {"date": "2026-12-03 11:12"}, "rows": rows,
         "summary": {"memit": {"seconds_per_edit": 9.0, "n_edits": 400, "status": "stopped at 400 edits"}}}))
    args = ["--model", "m", "--edits", "400", "--data", str(data), "--runs", str(tmp_path / "runs"),
            "--methods", "memit,alphaedit", "--report-only"]
    assert bs.main(args) == 0
    rec = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert [r["edits"] for r in rec["rows"] if r["method"] == "memit"] == [0, 200, 400]
    assert rec["summary"]["memit"]["n_edits"] == 400
    assert "reported earlier (2026-12-03 11:12" in rec["summary"]["memit"]["status"]
    assert (tmp_path / "results" / f"{name}.png").stat().st_size > 0
    # written twice: the status is not extended again, the rows stay
    assert bs.main(args) == 0
    again = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert again["summary"]["memit"]["status"] == rec["summary"]["memit"]["status"]
    assert again["rows"] == rec["rows"]
    # a run directory that is behind (restarted from scratch) does not replace the reported rows
    monkeypatch.setattr(bs, "read_stream", lambda out: {"finished": False, "rows": [groups(200, 0.5)],
                                                        "n_edits": 200, "batches": [], "seconds_per_edit": 5.0}
                        if "memit" in out.name else None)
    assert bs.main(args) == 0
    third = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert [r.get("retention_ES") for r in third["rows"]] == [None, 0.98, 0.95]
    # reporting another method alone keeps the earlier one in the table
    assert bs.main([*args[:-3], "--methods", "alphaedit", "--report-only"]) == 0
    fourth = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert fourth["rows"] == third["rows"] and list(fourth["summary"]) == ["memit"]


def test_bench_longform_reports_the_methods_on_the_questions_all_of_them_answered(tmp_path, monkeypatch):
    """An interrupted long-form run compares the methods over the questions that every method
    and the unedited model answered (a paired comparison), and draws the bars."""
    import types

    import benchmarks.bench_longform as bl
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bl, "RESULTS", tmp_path)
    q = lambda c, cat=None: types.SimpleNamespace(case_id=c, category=cat)
    data = {"editevery": [q("e1", "math"), q("e2", "code")], "unke": [q("u1"), q("u2")]}
    scores = lambda v: {k: v for k in bl.SHOW}
    items = {}
    for m, v in (("unedited", 0.1), ("anyedit-memit", 0.6), ("memit", 0.3)):
        for d, c in (("editevery", "e1"), ("unke", "u1")):
            items[f"{m}|{d}|{c}"] = {"method": m, "dataset": d, "category": data[d][0].category,
                                     "edit_s": 1.0, "gen_s": 2.0, **scores(v)}
    # a second question only anyedit-memit reached: not in the tables
    items["unedited|unke|u2"] = {"method": "unedited", "dataset": "unke", "category": None, "gen_s": 2.0,
                                 **scores(0.9)}
    items["anyedit-memit|unke|u2"] = {"method": "anyedit-memit", "dataset": "unke", "category": None,
                                      "edit_s": 1.0, "gen_s": 2.0, **scores(0.9)}
    # memit reused anyedit-memit's targets on u1: on its own it would have paid 5 s for them
    items["memit|unke|u1"] |= {"edit_alone_s": 6.0, "targets_reused": True}
    a = types.SimpleNamespace(model="m", n=2, max_new_tokens=64)
    bl.report(a, "lf", ["anyedit-memit", "memit"], data, items)
    rec = json.loads((tmp_path / "lf.json").read_text())
    alone = {(r["method"], r["dataset"]): r.get("edit_alone_s") for r in rec["rows"] if r["method"] == "memit"}
    assert alone == {("memit", "editevery"): None, ("memit", "unke"): 6.0}
    got = {(r["method"], r["dataset"]): (r["n"], r["rougeL"]) for r in rec["rows"]}
    assert got == {("unedited", "editevery"): (1, 0.1), ("unedited", "unke"): (1, 0.1),
                   ("anyedit-memit", "editevery"): (1, 0.6), ("anyedit-memit", "unke"): (1, 0.6),
                   ("memit", "editevery"): (1, 0.3), ("memit", "unke"): (1, 0.3)}
    assert "editevery: 1 of 2, unke: 1 of 2 answered by every method" in (tmp_path / "lf.md").read_text()
    cats = json.loads((tmp_path / "lf_by_category.json").read_text())["rows"]
    assert {(r["method"], r["category"]) for r in cats if r["dataset"] == "editevery"} == {
        ("unedited", "math"), ("anyedit-memit", "math"), ("memit", "math")}
    assert (tmp_path / "lf.png").stat().st_size > 0


def test_bench_batch_report_only_tables_the_rows_measured_so_far(tmp_path, monkeypatch):
    """An unfinished batch table (a batch size not reached) is written from the kept rows:
    the missing rows are named, the speed-up is against the method's smallest batch, nothing
    is run; with no kept rows it exits 2."""
    import benchmarks.bench_batch as bb
    import benchmarks.common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(bb, "RESULTS", tmp_path)
    monkeypatch.setattr(bb, "run_child", lambda *a: (_ for _ in ()).throw(AssertionError("ran a batch")))
    argv = ["bench_batch.py", "--model", "m", "--sizes", "10,100,1000", "--name", "bt", "--report-only"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        bb.main()
    assert e.value.code == 2
    ident = {"model": "m", "data": None, "workers": "auto", "zopt_chunk": 64, "eval_limit": 200, "device": "cpu",
             "set": []}
    row = lambda m, n, s: {"method": m, "batch": n, "s_per_edit": s, "batch_s": s * n}
    kept = {"memit:10": row("memit", 10, 4.0), "memit:100": row("memit", 100, 3.2), "memit:1000": row("memit", 1000, 2.0),
            "alphaedit:10": row("alphaedit", 10, 3.0), "alphaedit:100": row("alphaedit", 100, 2.5)}
    (tmp_path / "bt.rows.json").write_text(json.dumps({"identity": ident, "rows": kept}))
    bb.main()
    rec = json.loads((tmp_path / "bt.json").read_text())
    got = {(r["method"], r["batch"]): round(r["speedup_vs_smallest"], 3) for r in rec["rows"]}
    assert got == {("memit", 10): 1.0, ("memit", 100): 1.25, ("memit", 1000): 2.0,
                   ("alphaedit", 10): 1.0, ("alphaedit", 100): 1.2}
    md = (tmp_path / "bt.md").read_text()
    assert "Not measured: alphaedit x 1000." in md
    assert "memit: 5.6 h for 10,000 at the s/edit of 1000" in md and "alphaedit: 6.9 h" in md
    # options other than those the rows were measured with are refused
    monkeypatch.setattr(sys, "argv", [*argv, "--zopt-chunk", "32"])
    with pytest.raises(SystemExit) as e:
        bb.main()
    assert e.value.code == 2


def test_bench_longform_answers_are_tied_to_every_resolved_hyper_parameter():
    """Kept answers made with another resolved hyper-parameter (a changed default) clash and
    are named; methods not kept yet, or kept with equal settings, do not."""
    from benchmarks.bench_longform import config_clash

    kept = {"memit": {"window_size": 0, "v_lr": 2.0}, "anyedit-memit": {"window_size": 20, "v_lr": 2.0}}
    now = {"memit": {"window_size": 0, "v_lr": 2.0}, "anyedit-memit": {"window_size": 10, "v_lr": 2.0},
           "alphaedit": {"window_size": 0}}
    assert config_clash(kept, now) == {"anyedit-memit": ["window_size"]}
    assert config_clash(kept, {"memit": kept["memit"]}) == {}


def test_tune_longform_validation_never_touches_the_benchmark_questions():
    """AnyEdit's solve is tuned on questions the long-form benchmark does not report:
    EditEverything outside its stratified pick, UnKE after its first N; the table pairs the
    configurations over the questions all of them answered."""
    from benchmarks.bench_longform import DATASETS, pick
    from benchmarks.common import SHARED
    from benchmarks.tune_longform import summarise, validation_questions

    if not (SHARED / DATASETS["editevery"]).exists():
        pytest.skip(f"needs {SHARED / DATASETS['editevery']} (../shared/data is absent)")
    from kedit_core.data import read_dataset

    val = validation_questions(4, 50)
    ee = [r for r in read_dataset(SHARED / DATASETS["editevery"]).requests if r.long_target]
    uk = [r for r in read_dataset(SHARED / DATASETS["unke"]).requests if r.long_target]
    bench = {r.case_id for r in pick(ee, 50, stratify=True)}
    assert len(val["editevery"]) == 4 and not bench & {r.case_id for r in val["editevery"]}
    assert len({r.category for r in val["editevery"]}) == 4
    assert not {r.case_id for r in uk[:50]} & {r.case_id for r in val["unke"]}

    row = lambda c, d, q, v: {"config": c, "dataset": d, "case": q, **{k: v for k in
                              ("z_loss", "tf_nll", "tf_acc", "first_miss", "rougeL", "bleu", "minilm_cosine")}}
    rows = {f"{c}|{d}|{q}": row(c, d, q, v) for c, d, q, v in [
        ("a", "unke", "1", 0.2), ("b", "unke", "1", 0.6), ("a", "editevery", "2", 0.4), ("b", "editevery", "2", 0.8),
        ("a", "unke", "3", 0.9)]}                       # question 3: only a answered it
    got = {(r["config"], r["dataset"]): (r["n"], round(r["rougeL"], 6)) for r in summarise(rows, ["a", "b"])}
    assert got == {("a", "editevery"): (1, 0.4), ("a", "unke"): (1, 0.2), ("a", "all"): (2, 0.3),
                   ("b", "editevery"): (1, 0.8), ("b", "unke"): (1, 0.6), ("b", "all"): (2, 0.7)}


def test_bench_longform_shards_answer_disjoint_questions_and_are_read_together(tmp_path, monkeypatch):
    """--shard I/K takes every K-th question into a file of its own; a later run reads the
    main file and every shard's; a malformed --shard exits 2."""
    import benchmarks.bench_longform as bl

    monkeypatch.setattr(bl, "RESULTS", tmp_path)
    assert bl.parse_shard(None) is None and bl.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(SystemExit) as e:
            bl.parse_shard(bad)
        assert e.value.code == 2
    for f in ("lf.items.json", "lf.items.0of2.json", "lf.items.1of2.json", "lf2.items.json"):
        (tmp_path / f).write_text("{}")
    assert [p.name for p in bl.kept_files("lf")] == ["lf.items.json", "lf.items.0of2.json", "lf.items.1of2.json"]
    import benchmarks.tune_longform as tl                # the validation sweeps shard the same way

    monkeypatch.setattr(tl, "RESULTS", tmp_path)
    for f in ("tl.rows.json", "tl.rows.1of2.json", "tl2.rows.0of2.json"):
        (tmp_path / f).write_text("{}")
    assert [p.name for p in tl.rows_files("tl")] == ["tl.rows.json", "tl.rows.1of2.json"]


def test_bench_longform_adopts_only_answers_made_with_the_same_resolved_settings(tmp_path, monkeypatch):
    """--adopt RUN:old=new takes over RUN's answers of `old` as `new`'s (marked, never over an
    answer `new` already has) when model, answer length, --set and every resolved
    hyper-parameter agree; any difference, an unknown method or a missing run exits 2."""
    import types

    import benchmarks.bench_longform as bl

    monkeypatch.setattr(bl, "RESULTS", tmp_path)
    conf = {"base": "memit", "window_size": 0, "v_num_grad_steps": 25, "mom2_update_weight": 2000.0}
    args = {"model": "m", "max_new_tokens": 64, "set": "{}", "configs": {"memit": conf}}
    old = {"memit|unke|1": {"method": "memit", "rougeL": 0.3}, "memit|unke|2": {"method": "memit", "rougeL": 0.4},
           "anyedit-memit|unke|1": {"method": "anyedit-memit", "rougeL": 0.9}}
    (tmp_path / "old.items.json").write_text(json.dumps({"args": args, "items": old}))
    a = types.SimpleNamespace(model="m", max_new_tokens=64, set="{}")
    items = {"memit-own|unke|2": {"method": "memit-own", "rougeL": 0.5}}
    assert bl.adopt("old:memit=memit-own", {"memit-own": dict(conf)}, a, items) == 1
    assert items["memit-own|unke|1"] == {"method": "memit-own", "rougeL": 0.3, "adopted_from": "old:memit"}
    assert items["memit-own|unke|2"]["rougeL"] == 0.5 and len(items) == 2
    for spec, configs, ns in [
            ("old:memit=memit-own", {"memit-own": conf | {"v_num_grad_steps": 75}}, a),     # a setting
            ("old:memit=memit-own", {"memit-own": conf}, types.SimpleNamespace(model="m", max_new_tokens=512, set="{}")),
            ("old:memit=memit-own", {"other": conf}, a),                                   # not run here
            ("old:alphaedit=memit-own", {"memit-own": conf}, a),                           # not in RUN
            ("gone:memit=memit-own", {"memit-own": conf}, a), ("old-memit", {"memit-own": conf}, a)]:
        with pytest.raises(SystemExit) as e:
            bl.adopt(spec, configs, ns, dict(items))
        assert e.value.code == 2, spec


def test_peak_rss_reset_gives_each_in_process_cell_its_own_peak(tmp_path):
    """The peak after reset_peak_rss() is the peak of what follows, not of what came before;
    a cell whose peak could not be reset is labelled as the process's in the report."""
    import mmap

    import numpy as np

    from pipelines.bench_job import BenchConfig, write_report
    from pipelines.evaluation import reset_peak_rss, rss_mb

    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak RSS (/proc/self/clear_refs)")
    base = rss_mb()["rss_mb"]
    # 400 MB of fresh pages straight from the kernel: an anonymous mapping of its own, every page
    # touched, then unmapped. (np.ones went through malloc, which in a process that has run other
    # tests can hand back memory that is already resident: the peak then never moved, and CI failed.)
    big = mmap.mmap(-1, 400 * 2**20)
    pages = np.frombuffer(big, dtype=np.uint8)
    pages[::mmap.PAGESIZE] = 1
    del pages
    assert rss_mb()["rss_mb"] >= base + 350
    big.close()
    assert rss_mb()["peak_rss_mb"] >= base + 350
    assert reset_peak_rss()
    after = rss_mb()
    assert after["peak_rss_mb"] < base + 200 and after["peak_rss_mb"] >= after["rss_mb"] - 1
    rows = [{"method": m, "data": "builtin", "family": "counterfact", "cell": f"{m}__builtin", "set": {},
             "pre": {}, "post": {"all/efficacy_score": 1.0}, "seconds_per_edit": 1.0, "n_edits": 2,
             "peak_rss_mb": 1234.0, "peak_rss_scope": sc} for m, sc in (("memit", "cell"), ("rome", "process"))]
    (tmp_path / "b").mkdir()
    write_report(tmp_path / "b", BenchConfig(model="tiny-random-llama", methods=["memit", "rome"],
                                             data=["builtin"], out=str(tmp_path / "b")), rows)
    md = (tmp_path / "b" / "report.md").read_text()
    assert "| 1234 |" in md and "| 1234 (process) |" in md and "the process's peak so far" in md


def test_bench_job_config_file_and_flags(tmp_path):
    """`kedit bench --config FILE.yaml`: the shipped bench job parses into the table's cells; flags
    win over the file; YAML values of --set become the command line's strings; bad keys and
    types are one-line errors naming the file and the key."""
    from kedit_core.errors import BadInputError
    from pipelines.bench_job import build_bench_config
    from tests.conftest import ROOT

    job = ROOT / "cluster_configs" / "jobs" / "bench" / "smollm2_methods_x_benchmarks.yaml"
    cfg = build_bench_config(str(job))
    assert cfg.model == "smollm2-135m" and cfg.limit == 100 and cfg.batch_size == 10 and cfg.ray
    assert {"rome", "rome@lti", "memit", "alphaedit", "ft-m", "ike"} <= set(cfg.methods) and len(cfg.data) == 4
    assert cfg.set == {"rome@lti": {"lti": "true"}, "memit@lti": {"lti": "true"}}
    # the acceptance run's record holds the same cell hyper-parameters (a rerun would be accepted)
    rec = json.loads((ROOT / "benchmarks/results/bench_smollm2-135m/bench.json").read_text())
    assert rec["cells"]["rome@lti__evoke_main_sample100"]["set"] == cfg.set["rome@lti"]
    over = build_bench_config(str(job), limit=20, out=str(tmp_path / "b"), ray=False,
                              set={"memit": {"layers": "4,5"}})
    assert over.limit == 20 and over.out == str(tmp_path / "b") and not over.ray
    assert over.set["memit"] == {"layers": "4,5"} and over.set["rome@lti"] == {"lti": "true"}
    f = tmp_path / "j.yaml"
    f.write_text("methods: memit\ndata: a.json,b.json\nset: {memit: {layers: [4, 5], mom2_update_weight: 2000}}\n")
    c = build_bench_config(str(f))
    assert c.methods == ["memit"] and c.data == ["a.json", "b.json"]
    assert c.set == {"memit": {"layers": "4,5", "mom2_update_weight": "2000"}}
    for text, key in (("methodz: [memit]\n", "methodz"), ("limit: many\n", "limit"), ("set: [1]\n", "set")):
        f.write_text(text)
        with pytest.raises(BadInputError) as e:
            build_bench_config(str(f))
        assert str(f) in str(e.value) and key in str(e.value)
