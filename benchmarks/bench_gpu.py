"""The GPU path on real model shapes (issue 13 point 4), through `kedit_core` directly.

Speed and memory do not depend on weight values, so the model is `random:<config>` (a real
config.json, random weights: kedit_core.models.random_init), e.g. Llama-3-8B or GPT-J-6B in
bf16 and fp32. For one model and dtype it measures:

* the matmul peak of this device (square products, bf16 / TF32 / fp32): the denominator of
  every fraction below;
* second-moment statistics: tokens/s of the whole pass (one forward to the deepest edited
  layer, k^T k of every edited layer) and, alone, the accumulation's TFLOP/s as a fraction
  of the peak of the precision it runs in (keys of a bf16 model: TF32, exact; fp32: fp32);
* MEMIT and AlphaEdit on one batch (default 100 requests): s/edit, split into target
  optimisation, key passes and the rest (the closed-form solves), AlphaEdit's projector
  (eigendecomposition) once, and the device's peak memory;
* the large MEMIT batch (default 10,000 requests, chunked: only the d x d sums are kept),
  run in full when the batch of 100 predicts it fits `--big-budget-s`, else the largest
  multiple of the chunk that does (reported as such, with the prediction for the full size).

Requests are the built-in CounterFact-style set, cycled to the batch size (for timing only:
random weights learn nothing). The target optimisation runs its full `--steps` (a random
model never reaches the early stop, so this is the worst case).

    python benchmarks/bench_gpu.py --model random:llama3-8b@TOKENIZER_DIR --dtype bf16
    python benchmarks/bench_gpu.py --model random:smollm2-135m --device cpu --smoke   # the CPU check

Writes OUT/gpu_<model>_<dtype>.json and .md (default benchmarks/results/). On the lent GPU
machine (no Ray, no MLflow there) only kedit_core, torch and transformers are needed; a real
tokenizer directory (`@DIR`) makes prompt lengths those of a trained BPE (the byte-level
fallback makes them about four times longer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS, _fmt, machine, peak_rss_mb  # noqa: E402

log = logging.getLogger("bench_gpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def peak_mem_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return peak_rss_mb() / 1024


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


# ------------------------------------------------------------------------------ matmul peak
def matmul_peak(dev: torch.device, n: int, iters: int) -> dict[str, float]:
    """TFLOP/s of n x n x n products: bf16, TF32 (fp32 inputs on tensor cores) and fp32."""
    out = {}
    kinds = [("bf16", torch.bfloat16, False), ("tf32", torch.float32, True), ("fp32", torch.float32, False)]
    for name, dtype, tf32 in kinds:
        if dev.type != "cuda" and name == "tf32":
            continue
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            for _ in range(2):
                a @ b
            _, dt = timed(lambda: [a @ b for _ in range(iters)], dev)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[name] = 2 * n ** 3 * iters / dt / 1e12
        del a, b
    return out


# ------------------------------------------------------------------------------ statistics
def stats_bench(lm, sites, n_texts: int, seq_len: int, batch_tokens: int, peaks: dict) -> tuple[dict, dict]:
    from kedit_core.stats.moments import SecondMoment, collect_second_moments

    dev = lm.device
    g = torch.Generator().manual_seed(0)
    vocab = len(lm.tokenizer)
    token_lists = torch.randint(0, vocab, (n_texts, seq_len), generator=g).tolist()
    reset_peak(dev)
    moments, dt = timed(lambda: collect_second_moments(lm, sites, token_lists, batch_tokens=batch_tokens), dev)
    tokens = n_texts * seq_len
    d = moments[sites[0]].sum.shape[0]
    # the accumulation alone, on keys of the model's dtype and a full batch's size
    k = torch.randn(batch_tokens, d, device=dev, dtype=lm.dtype)
    m = SecondMoment.zeros(d, device=dev)
    m.update(k)
    reps = 5
    _, dta = timed(lambda: [m.update(k) for _ in range(reps)], dev)
    accum_tflops = 2 * batch_tokens * d * d * reps / dta / 1e12
    precision = ("tf32" if lm.dtype in (torch.bfloat16, torch.float16) and dev.type == "cuda" else
                 "fp64" if lm.dtype == torch.float64 else "fp32")
    peak = peaks.get(precision)
    accum_s = len(sites) * 2 * tokens * d * d / (accum_tflops * 1e12)
    row = {"stage": "statistics", "tokens": tokens, "texts": n_texts, "seq_len": seq_len, "sites": len(sites),
           "d": d, "seconds": dt, "tokens_per_s": tokens / dt, "accum_tflops": accum_tflops,
           "accum_precision": precision, "accum_peak_tflops": peak,
           "accum_fraction_of_peak": accum_tflops / peak if peak else None,
           "accum_share_of_pass": min(1.0, accum_s / dt), "peak_mem_gb": peak_mem_gb(dev)}
    del k, m
    return row, moments


# ------------------------------------------------------------------------------ edits
def requests(n: int):
    """The built-in requests cycled to n (case ids made unique)."""
    from kedit_core.data import load_requests

    base = load_requests()
    return [dataclasses.replace(base[i % len(base)], case_id=f"{base[i % len(base)].case_id}#{i // len(base)}")
            for i in range(n)]


def timed_backend(lm, chunk: int):
    """LocalBackend that adds up the seconds of its target optimisation and key passes."""
    from kedit_core.methods.common import LocalBackend

    class Timed(LocalBackend):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.t_targets = self.t_keys = 0.0

        def targets(self, *a, **kw):
            out, dt = timed(lambda: super(Timed, self).targets(*a, **kw), lm.device)
            self.t_targets += dt
            return out

        def layer_moments(self, *a, **kw):
            out, dt = timed(lambda: super(Timed, self).layer_moments(*a, **kw), lm.device)
            self.t_keys += dt
            return out

    return Timed(lm, chunk)


def edit_bench(lm, method_name: str, n: int, moments, steps: int, chunk: int, label: str = "") -> dict:
    from kedit_core.methods import get_method, make_config
    from kedit_core.stats import StatsView

    method = get_method(method_name)
    over = {"v_num_grad_steps": steps} if steps else {}
    cfg = make_config(method.config_cls, lm, over)
    dev = lm.device
    state, t_prep = timed(lambda: method.prepare(lm, cfg, StatsView(moments)), dev)
    reqs = requests(n)
    backend = timed_backend(lm, chunk)
    reset_peak(dev)
    (result, _), dt = timed(lambda: method.compute(lm, reqs, state, backend), dev)
    z_steps = result.info.get("z_steps") or [0]
    rest = dt - backend.t_targets - backend.t_keys
    return {"stage": label or f"{method_name} batch {n}", "method": method_name, "batch": n, "chunk": chunk,
            "chunks": result.info.get("chunks"), "layers": list(cfg.layers), "steps": cfg.v_num_grad_steps,
            "z_steps_mean": sum(z_steps) / len(z_steps), "seconds": dt, "s_per_edit": dt / n,
            "targets_s_per_edit": backend.t_targets / n, "keys_s_per_edit": backend.t_keys / n,
            "solve_s_per_edit": rest / n, "prepare_s": t_prep, "peak_mem_gb": peak_mem_gb(dev)}


# ------------------------------------------------------------------------------ main
def run(args) -> dict:
    """Every stage in turn; the report is rewritten after each, so a run stopped by a time
    limit keeps what it measured."""
    from kedit_core.methods import get_method, make_config
    from kedit_core.methods.common import mlp_out_stats
    from kedit_core.models import load

    t_start = time.perf_counter()
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    peaks = matmul_peak(dev, args.matmul_n, args.matmul_iters)
    log.info("matmul peak TFLOP/s: %s", {k: round(v, 1) for k, v in peaks.items()})
    lm, t_load = timed(lambda: load(args.model, dtype=args.dtype, device=str(dev)), dev)
    n_params = sum(p.numel() for p in lm.model.parameters())
    log.info("%s, built in %.1fs", lm.source, t_load)
    res = {"machine": {**machine(), "device": str(dev),
                       "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"},
           "model": args.model, "source": lm.source, "params_b": n_params / 1e9,
           "dtype": str(lm.dtype).replace("torch.", ""), "load_s": t_load, "matmul_peak_tflops": peaks,
           "rows": [], "args": vars(args), "wall_s": 0.0}

    def add(row: dict) -> None:
        res["rows"].append(row)
        res["wall_s"] = time.perf_counter() - t_start
        report(res, args.out, quiet=True)

    cfg = make_config(get_method("memit").config_cls, lm, {})
    sites = [k.site for k in mlp_out_stats(lm, cfg.layers)]
    srow, moments = stats_bench(lm, sites, args.stats_texts, args.seq_len, args.batch_tokens, peaks)
    add(srow)
    log.info("statistics: %.0f tokens/s; accumulation %.1f TFLOP/s (%s)", srow["tokens_per_s"],
             srow["accum_tflops"], srow["accum_precision"])
    memit_row = None
    for m in [x for x in args.methods.split(",") if x]:
        r = edit_bench(lm, m, args.batch, moments, args.steps, args.chunk)
        add(r)
        log.info("%s: %.3f s/edit (targets %.3f, keys %.3f, solve %.3f)", r["stage"], r["s_per_edit"],
                 r["targets_s_per_edit"], r["keys_s_per_edit"], r["solve_s_per_edit"])
        memit_row = r if m == "memit" else memit_row
    if args.big and memit_row is not None:
        left = args.big_budget_s - (time.perf_counter() - t_start)
        predicted = memit_row["s_per_edit"] * args.big
        n_big = args.big
        if predicted > left:
            n_big = max(args.chunk, int(left / memit_row["s_per_edit"]) // args.chunk * args.chunk)
        r = edit_bench(lm, "memit", n_big, moments, args.steps, args.chunk,
                       label=f"memit batch {n_big}" + ("" if n_big == args.big else f" (of {args.big}: budget)"))
        r["predicted_full_s"] = r["s_per_edit"] * args.big
        r["full_size"] = args.big
        add(r)
        log.info("%s: %.3f s/edit, peak %.1f GB", r["stage"], r["s_per_edit"], r["peak_mem_gb"])
    return res


COLUMNS = ["stage", "seconds", "s_per_edit", "targets_s_per_edit", "keys_s_per_edit", "solve_s_per_edit",
           "z_steps_mean", "prepare_s", "tokens_per_s", "accum_tflops", "accum_fraction_of_peak",
           "accum_share_of_pass", "peak_mem_gb"]


def report(res: dict, out: Path, quiet: bool = False) -> Path:
    from kedit_core.io import atomic_write_text

    short = res["model"].split("@")[0].replace("random:", "").replace("/", "_")
    name = f"gpu_{short}_{res['dtype']}" + (f"_{res['args']['tag']}" if res["args"].get("tag") else "")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(res, indent=1, default=str))
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in res["matmul_peak_tflops"].items())
    m = res["machine"]
    lines = [f"# {name}", "",
             f"{res['source']} ({res['dtype']}) on {m['device_name']}; matmul peak measured here (TFLOP/s): {peaks}. "
             "Statistics: one pass to the deepest MEMIT layer, k^T k of each; accum_* is the accumulation alone "
             "against the peak of the precision it runs in. Edits: s/edit split into target optimisation, key "
             "passes and the rest (solves); prepare_s: AlphaEdit's projectors (eigendecomposition) or MEMIT's C. "
             "Random weights: the target optimisation runs all its steps (the worst case).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    big = [r for r in res["rows"] if "predicted_full_s" in r]
    if big:
        b = big[0]
        lines += ["", f"MEMIT batch of {b['batch']}: {b['seconds']:.0f} s; predicted for {b['full_size']}: "
                      f"{b['predicted_full_s']:.0f} s at its s/edit."]
    lines += ["", f"machine: {json.dumps(m)}", ""]
    path = out / f"{name}.md"
    atomic_write_text(path, "\n".join(lines))
    if not quiet:
        print("\n".join(lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--big", type=int, default=10_000, help="the large MEMIT batch (0: none)")
    ap.add_argument("--big-budget-s", type=float, default=420.0,
                    help="seconds since start by which the large batch must be done (it is cut to fit)")
    ap.add_argument("--chunk", type=int, default=128, help="requests per target-optimisation chunk")
    ap.add_argument("--steps", type=int, default=0, help="target optimisation steps (0: the method's default)")
    ap.add_argument("--stats-texts", type=int, default=2000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--matmul-iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of the script)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.big, args.chunk, args.steps = min(args.batch, 4), min(args.big, 8), min(args.chunk, 4), 2
        args.stats_texts, args.seq_len, args.batch_tokens = 8, 16, 64
        args.matmul_n, args.matmul_iters = 256, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    report(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
