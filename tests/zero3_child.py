"""Run by tests/test_zero3.py in a fresh process (DeepSpeed's accelerator and process group
are per process): the same edits on a plain and on a ZeRO-3-partitioned copy of a tiny
model; every number the test compares is printed as one JSON line."""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from kedit_core import Editor, load_requests  # noqa: E402
from kedit_core.apply import DeltaApplier, read_weights  # noqa: E402
from kedit_core.editor import save_model  # noqa: E402
from kedit_core.methods.common import LocalBackend, zopt_config  # noqa: E402
from kedit_core.models import load  # noqa: E402
from kedit_core.models.loader import iter_full_state  # noqa: E402
from pipelines.checkpoint import tensors_hash  # noqa: E402


def full_hash(lm) -> str:
    return tensors_hash(dict(iter_full_state(lm)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(tmp: str, corpus: str) -> None:
    out: dict = {}
    plain = load("tiny-random-llama", device="cpu")
    z = load("tiny-random-llama", device="cpu", zero3=True)
    h0 = full_hash(plain)
    site = plain.arch.mlp_out_site(1)
    w = z.arch.weight(z.model, site)
    out["partitioned"] = z.zero3 and w.numel() == 0 and tuple(w.ds_shape) == tuple(
        plain.arch.weight(plain.model, site).shape)
    out["dims_equal"] = z.arch.dims(z.model, site) == plain.arch.dims(plain.model, site)
    out["state_equal"] = full_hash(z) == h0 and z.fingerprint() == plain.fingerprint()
    ids = plain.tokenizer(["The capital of France is the city of"], return_tensors="pt").input_ids
    with torch.no_grad():
        out["logits_max_diff"] = float((z.model(ids).logits - plain.model(ids).logits).abs().max())

    reqs = load_requests()[:4]
    for method in ("memit", "alphaedit"):
        r = out[method] = {}
        eds = {name: Editor(lm, method, corpus, stats_dir=os.path.join(tmp, f"{method}-{name}"),
                            show_progress=False, layers=(1, 2), v_num_grad_steps=4, mom2_n_samples=16)
               for name, lm in (("plain", plain), ("zero3", z))}
        # Statistics, keys and the closed-form parts: bit-identical through the partitioned path.
        mp, mz = eds["plain"].stats.moments, eds["zero3"].stats.moments
        r["stats_max_rel_diff"] = max(rel(mz[k].mean(), mp[k].mean()) for k in mp)
        cfg = eds["plain"].cfg
        zp = LocalBackend(plain).targets(reqs[:2], zopt_config(cfg, 2, "block"))
        mom = [LocalBackend(lm).layer_moments(reqs[:2], zp.targets, 1, 2, 0.5) for lm in (plain, z)]
        r["moments_bit_identical"] = all(torch.equal(a, b) for a, b in zip(*mom))
        # Writes through GatheredParameters(modifier_rank=0) are exact.
        dense = [d for d in eds["plain"].method.compute(plain, reqs[:2], eds["plain"].state)[0].deltas]
        apps = [DeltaApplier(lm) for lm in (plain, z)]
        for a in apps:
            a.apply(dense)
        r["applied_bit_identical"] = full_hash(z) == full_hash(plain) != h0
        for a in apps:
            a.revert()
        r["reverted_bit_identical"] = full_hash(z) == full_hash(plain) == h0
        # Two sequential batches end to end through each path; target optimisation's
        # backward passes differ from the plain ones in float32 summation order only.
        deltas: dict[str, list] = {"plain": [], "zero3": []}
        for b in (reqs[:2], reqs[2:]):
            for name, ed in eds.items():
                deltas[name] += [d.matrix() for d in ed.edit_batch(b)["deltas"]]
        r["delta_max_rel_diff"] = max(rel(a, b) for a, b in zip(deltas["zero3"], deltas["plain"]))
        wz = read_weights(z, eds["zero3"].applier.originals)
        wp = read_weights(plain, eds["plain"].applier.originals)
        r["sites"] = sorted(wz) if sorted(wz) == sorted(wp) else None
        r["weights_max_rel_change_diff"] = max(
            rel(wz[s] - eds["zero3"].applier.originals[s], wp[s] - eds["plain"].applier.originals[s]) for s in wp)
        ez, ep = eds["zero3"].evaluate(reqs), eds["plain"].evaluate(reqs)
        r["metrics"] = {"plain": ep, "zero3": ez}
        if method == "alphaedit":  # a ZeRO-3 model exports as an ordinary HF model
            save_model(z, os.path.join(tmp, "export"))
            exported = load(os.path.join(tmp, "export"), device="cpu")
            r["export_equal"] = full_hash(exported) == full_hash(z)
        for ed in eds.values():
            ed.revert()
        r["reverted"] = full_hash(z) == full_hash(plain) == h0
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
