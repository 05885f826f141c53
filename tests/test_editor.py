"""The Python API and `kedit edit-local` on a tiny model (mechanics, not quality)."""

import json

import pytest
import torch

from kedit_core import Editor, load_requests
from kedit_core.models import load
from pipelines.cli import main

CORPUS = "\n".join(["Paris is the capital of France.", "Rome is in Italy.",
                    "The Eiffel Tower is a tower.", "Tokyo is a large city in Japan."] * 8)


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS)
    return str(p)


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome"])
def test_editor_edit_evaluate_save_revert(method, corpus, tmp_path):
    lm = load("tiny-random-gpt2", device="cpu")
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    layers = (2,) if method == "rome" else (1, 2)
    ed = Editor(lm, method, corpus, stats_dir=str(tmp_path / "stats"), show_progress=False,
                layers=layers, v_num_grad_steps=3, mom2_n_samples=16)
    reqs = load_requests()[:4]
    m0 = ed.evaluate(reqs)
    assert {"efficacy_score", "paraphrase_score", "neighborhood_score", "score"} <= m0.keys()
    recs = ed.edit(reqs, batch_size=2)
    assert len(recs) == 2 and ed.n_edits == 4 and all(r["seconds"] > 0 for r in recs)
    changed = [n for n, p in lm.model.state_dict().items() if not torch.equal(p, before[n])]
    assert changed and all("mlp.c_proj" in n for n in changed)
    m1 = ed.evaluate(reqs, perplexity_texts=4)
    assert 0 <= m1["locality"] <= 1 and m1["perplexity"] > 1
    ed.save(tmp_path / "out")
    assert (tmp_path / "out" / "deltas.safetensors").is_file()
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["method"] == method and cfg["n_edits"] == 4
    exported = load(str(tmp_path / "out" / "model"), device="cpu")
    for n, p in lm.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[n], p), n
    ed.revert()
    for n, p in lm.model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert ed.n_edits == 0


def test_edit_local_cli(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["edit-local", "--model", "tiny-random-llama", "--device", "cpu", "--method", "memit",
            "--limit", "3", "--batch-size", "3", "--out", str(out), "--stats-corpus", corpus,
            "--set", "layers=1,2", "--set", "v_num_grad_steps=2", "--set", "mom2_n_samples=8",
            "--perplexity-texts", "4", "--no-export"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_edits"] == 3 and metrics["config"]["layers"] == [1, 2]
    assert {"efficacy_score", "perplexity"} <= metrics["pre"].keys() & metrics["post"].keys()
    assert metrics["seconds_per_edit"] > 0
    # a finished run is never overwritten
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    bad = args[:]
    bad[bad.index("layers=1,2")] = "layerz=1"
    bad[bad.index(str(out))] = str(tmp_path / "other")
    assert main(bad) == 2
    assert "field 'layerz'" in capsys.readouterr().err
