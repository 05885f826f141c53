"""`kedit tune` (issue 13 point 6): the objective's formula, the search space (parsing,
defaults per method, shifts resolved for a model, grid, bad spaces refused with exit 2), the
validation split (exclusions, seeded draws, a test split that overlaps it refused), and a
tune on a tiny model: trials through Ray Tune, best.json, MLflow child runs read back, a
second call that recomputes no finished trial."""

import json
import random
from types import SimpleNamespace

import pytest

from kedit_core.errors import BadInputError
from kedit_core.methods import get_method
from kedit_core.tune import (ObjectiveSpec, grid, objective, overlap, parse_space, resolve_space, sample,
                             split_requests)
from pipelines.cli import main as cli

ALPHA = get_method("alphaedit").config_cls


# ----------------------------------------------------------------------------- objective
def test_objective_is_a_weighted_harmonic_mean_times_a_perplexity_penalty():
    post = {"all/efficacy_score": 1.0, "all/paraphrase_score": 0.5, "all/neighborhood_score": 0.25,
            "perplexity": 10.0}
    o = objective(post, {"perplexity": 10.0})
    assert o["score"] == pytest.approx(3 / (1 + 2 + 4)) and o["objective"] == pytest.approx(3 / 7)
    assert o["ppl_ratio"] == 1.0 and o["ppl_penalty"] == 1.0
    # ES 1, NS 0.2: the harmonic mean (0.43) is dominated by the worst component, not 0.73
    assert objective({"efficacy_score": 1, "paraphrase_score": 1, "neighborhood_score": 0.2})["objective"] \
        == pytest.approx(3 / 7)
    # perplexity: free up to +5%, then the score times 1.05 / ratio
    assert objective(dict(post, perplexity=10.4), {"perplexity": 10.0})["ppl_penalty"] == 1.0
    o = objective(dict(post, perplexity=20.0), {"perplexity": 10.0})
    assert o["ppl_ratio"] == 2.0 and o["ppl_penalty"] == pytest.approx(0.525)
    assert o["objective"] == pytest.approx(3 / 7 * 0.525)
    o = objective(dict(post, perplexity=20.0), {"perplexity": 10.0}, ObjectiveSpec(ppl_tolerance=0, ppl_weight=2))
    assert o["ppl_penalty"] == pytest.approx(0.25)
    # weights: (2 * 1 + 1 * 0.5 ... ) harmonic: sum(w) / sum(w / v)
    o = objective(post, None, ObjectiveSpec(efficacy=2, generalisation=0, locality=1))
    assert o["objective"] == pytest.approx(3 / (2 / 1 + 1 / 0.25)) and o["ppl_penalty"] is None
    # a component at 0 gives 0; zsRE-style keys when CounterFact's are absent
    assert objective({"efficacy_score": 0.0, "paraphrase_score": 1, "neighborhood_score": 1})["objective"] == 0
    z = objective({"all/rewrite_acc": 0.8, "all/paraphrase_acc": 0.4, "all/locality": 0.8})
    assert z["objective"] == pytest.approx(3 / (1 / 0.8 + 1 / 0.4 + 1 / 0.8))
    with pytest.raises(BadInputError, match="no locality"):
        objective({"efficacy_score": 1, "paraphrase_score": 1})
    with pytest.raises(BadInputError, match="objective.ppl_weight"):
        ObjectiveSpec(ppl_weight=-1)


# ----------------------------------------------------------------------------- the space
def test_space_parsing_defaults_shift_grid_and_sampling():
    d = parse_space([], ALPHA)
    assert {"layers", "L2", "nullspace_threshold", "v_num_grad_steps", "clamp_norm_factor"} <= set(d)
    assert d["L2"].kind == "loguniform" and d["layers"].kind == "shift"
    s = parse_space(["layers=choice:[4,5,6],[3,4,5]", "L2=loguniform:1,100", "v_num_grad_steps=int:5,9",
                     "mom2_n_samples=2000"], ALPHA, use_default=False)
    assert s["layers"].values == ([4, 5, 6], [3, 4, 5]) and (s["L2"].low, s["L2"].high) == (1, 100)
    assert s["mom2_n_samples"].kind == "const" and s["mom2_n_samples"].values == (2000,)
    rng = random.Random(0)
    pts = [sample(s, rng) for _ in range(200)]
    assert all(1 <= p["L2"] <= 100 and 5 <= p["v_num_grad_steps"] <= 9 and p["layers"] in ([4, 5, 6], [3, 4, 5])
               for p in pts)
    # log-uniform: about half the draws below the geometric midpoint 10
    assert 0.4 < sum(p["L2"] < 10 for p in pts) / len(pts) < 0.6
    assert {p["v_num_grad_steps"] for p in pts} == {5, 6, 7, 8, 9}
    assert [sample(s, random.Random(3)) for _ in range(2)] == [sample(s, random.Random(3)) for _ in range(2)]
    # shifts of the model's default window; windows leaving the model are dropped
    r = resolve_space(parse_space(["layers=shift:-5,-1,0,1,30"], ALPHA, use_default=False),
                      SimpleNamespace(layers=(4, 5, 6, 7, 8)), n_layers=30)
    assert r["layers"].kind == "choice" and r["layers"].values == ([3, 4, 5, 6, 7], [4, 5, 6, 7, 8], [5, 6, 7, 8, 9])
    g = grid(parse_space(["layers=choice:[1],[2]", "L2=choice:1,10,100"], ALPHA, use_default=False))
    assert len(g) == 6 and {"layers": [2], "L2": 100.0} in g
    with pytest.raises(BadInputError, match="grid search needs choice"):
        grid(s)
    with pytest.raises(BadInputError, match="out of range"):
        resolve_space(parse_space(["layers=choice:[1],[40]"], ALPHA, use_default=False), None, n_layers=30)


@pytest.mark.parametrize("bad,field", [
    ("L2=loguniform:0,10", "space.L2"), ("L2=uniform:5,1", "space.L2"), ("nope=choice:1,2", "space.nope"),
    ("layers=uniform:1,3", "space.layers"), ("v_num_grad_steps=uniform:2,9", "space.v_num_grad_steps"),
    ("L2=choice:a,b", "space.L2"), ("L2", "space"), ("layers=shift:x", "space.layers"),
    ("L2=loguniform:1", "space.L2")])
def test_a_bad_space_is_refused_with_one_line_and_exit_2(bad, field, tmp_path, capsys):
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
        parse_space([bad], ALPHA, use_default=False)
    (tmp_path / "v.json").write_text("[]")
    rc = cli(["tune", "--model", "tiny-random-llama", "--data", str(tmp_path / "v.json"), "--space", bad,
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and field in err
    assert not (tmp_path / "o" / "tune.json").exists()


def test_nothing_to_search_grid_of_continuous_and_missing_searcher_refused(tmp_path, capsys):
    (tmp_path / "v.json").write_text("[]")
    base = ["tune", "--model", "tiny-random-llama", "--data", str(tmp_path / "v.json"), "--out", str(tmp_path / "o")]
    assert cli([*base, "--no-default-space", "--space", "L2=3"]) == 2
    assert "nothing to search" in capsys.readouterr().err
    assert cli([*base, "--search", "grid"]) == 2                       # the default space is continuous
    assert "grid search needs choice" in capsys.readouterr().err
    assert cli([*base, "--set", "L2=3", "--space", "L2=loguniform:1,9"]) == 2
    assert "both fixed" in capsys.readouterr().err
    assert cli([*base, "--method", "memprompt"]) == 2
    assert "no default search space" in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        assert cli([*base, "--search", "optuna"]) == 2
        assert "optuna is not installed" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the split
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from kedit_core.data import builtin_path, read_records

    d = tmp_path_factory.mktemp("tune")
    recs = read_records(builtin_path())
    (d / "val.json").write_text(json.dumps(recs[:6]))
    (d / "test.json").write_text(json.dumps(recs[6:9]))
    (d / "bench.json").write_text(json.dumps(recs[1:3]))     # "the records a benchmark reports"
    (d / "corpus.txt").write_text("\n".join(["Paris is the capital of France.", "Edits change facts in models."] * 30))
    return d


def test_split_excludes_benchmark_records_and_draws_with_a_seed(files, tmp_path):
    s = split_requests(files / "val.json", tmp_path / "a.json", limit=3, exclude=[files / "bench.json"])
    assert s.indices == [0, 3, 4] and s.excluded == 2 and len(s.source_sha256) == 64
    assert overlap(tmp_path / "a.json", files / "bench.json") == 0
    assert [r["case_id"] for r in json.loads((tmp_path / "a.json").read_text())] == \
        [json.loads((files / "val.json").read_text())[i]["case_id"] for i in (0, 3, 4)]
    a = split_requests(files / "val.json", tmp_path / "b.json", limit=3, seed=7)
    b = split_requests(files / "val.json", tmp_path / "c.json", limit=3, seed=7)
    assert a.indices == b.indices == sorted(a.indices) and len(a.indices) == 3
    assert (tmp_path / "b.json").read_bytes() == (tmp_path / "c.json").read_bytes()
    assert overlap(files / "val.json", files / "bench.json") == 2


def test_a_test_split_that_overlaps_the_validation_split_is_refused(files, tmp_path, capsys):
    rc = cli(["tune", "--model", "tiny-random-llama", "--data", str(files / "val.json"), "--test-data",
              str(files / "val.json"), "--limit", "2", "--test-limit", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "records of the test split are also in the validation split" in err


# ----------------------------------------------------------------------------- a tune
def argv(out, files, *extra):
    return ["tune", "--model", "tiny-random-llama", "--device", "cpu", "--method", "alphaedit",
            "--data", str(files / "val.json"), "--limit", "2", "--batch-size", "2", "--trials", "2",
            "--perplexity-texts", "0", "--stats-corpus", str(files / "corpus.txt"), "--set", "layers=0,1",
            "--set", "mom2_n_samples=40", "--set", "v_num_grad_steps=2", "--no-default-space",
            "--space", "L2=loguniform:0.1,100", "--space", "nullspace_threshold=loguniform:1e-3,1e-1",
            "--out", str(out), *extra]


def _check_tune(out, n_trials):
    best = json.loads((out / "best.json").read_text())
    assert len(best["trials"]) == n_trials and best["best"] is not None
    objs = [t["objective"] for t in best["trials"]]
    assert best["best"]["objective"] == max(objs)
    for t in best["trials"]:
        assert 0.1 <= t["params"]["L2"] <= 100 and t["hparams"]["L2"] == t["params"]["L2"]
        assert t["hparams"]["layers"] == [0, 1]
        m = json.loads((out / "trials" / t["key"] / "metrics.json").read_text())
        assert t["objective"] == pytest.approx(objective(m["post"], m["pre"])["objective"])
    assert best["split"]["indices"] == [0, 1] and len(best["split"]["source_sha256"]) == 64
    for f in ("report.md", "report.png", "tune.json"):
        assert (out / f).is_file()
    assert "| trial |" in (out / "report.md").read_text()
    # MLflow: a parent run and one child run per trial, with the trial's objective
    from mlflow.tracking import MlflowClient

    rec = json.loads((out / "mlflow.json").read_text())
    client = MlflowClient(rec["uri"])
    children = client.search_runs([rec["experiment_id"]], f"tags.mlflow.parentRunId = '{rec['run_id']}' "
                                                          "and tags.kedit_tune = 'trial'")
    assert len(children) == n_trials
    assert {c.data.tags["kedit_tune_key"] for c in children} == {t["key"] for t in best["trials"]}
    got = sorted(c.data.metrics["tune/objective"] for c in children)
    assert got == pytest.approx(sorted(objs))
    return best


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    from pipelines.raycluster import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_tune_on_ray_writes_best_json_child_runs_and_resumes(files, tmp_path, ray_cluster):
    out = tmp_path / "t"
    assert cli(argv(out, files, "--test-data", str(files / "test.json"), "--test-limit", "2")) == 0
    best = _check_tune(out, 2)
    assert (out / "ray_tune").is_dir()                     # the Tune experiment (restored by a re-run)
    test = best["test"]
    assert set(test) >= {"chosen", "default", "split"} and test["chosen"]["params"] == best["best"]["params"]
    assert overlap(out / "split" / "val.json", out / "split" / "test.json") == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")}
    assert len(stamps) == 4                                # 2 trials + chosen and default on the test split
    assert cli(argv(out, files, "--test-data", str(files / "test.json"), "--test-limit", "2")) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")} == stamps     # nothing recomputed
    again = json.loads((out / "best.json").read_text())
    assert again["best"] == best["best"] and len(again["trials"]) == 2
    from mlflow.tracking import MlflowClient

    rec = json.loads((out / "mlflow.json").read_text())
    runs = MlflowClient(rec["uri"]).search_runs([rec["experiment_id"]], f"tags.mlflow.parentRunId = '{rec['run_id']}'")
    assert sorted(r.data.tags.get("kedit_tune") for r in runs) == ["test-chosen", "test-default", "trial", "trial"]
    # another tune in the same directory is refused
    assert cli(argv(out, files, "--trials", "3")) == 2


@pytest.mark.slow
def test_tune_in_process_and_a_killed_trial_resumes(files, tmp_path):
    out = tmp_path / "l"
    assert cli(argv(out, files, "--no-ray")) == 0
    best = _check_tune(out, 2)
    # a trial whose stream was interrupted after its checkpoint: only its ending is redone
    t = best["trials"][1]
    tdir = out / "trials" / t["key"]
    keep = (out / "trials" / best["trials"][0]["key"] / "metrics.json").stat().st_mtime_ns
    (tdir / "trial.json").unlink()
    (tdir / "metrics.json").unlink()
    assert cli(argv(out, files, "--no-ray")) == 0
    again = _check_tune(out, 2)
    assert (out / "trials" / best["trials"][0]["key"] / "metrics.json").stat().st_mtime_ns == keep
    assert again["trials"][1]["objective"] == pytest.approx(t["objective"])
    assert again["trials"][1]["params"] == t["params"]
