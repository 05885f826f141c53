"""Shared helpers of the benchmark scripts: results as JSON plus a markdown table."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(name: str, rows: list[dict], columns: list[str], notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # atomic: a later run (or a second evaluation running beside this one) reads the table back
    from kedit_core.io import atomic_write_text

    atomic_write_text(RESULTS / f"{name}.json", json.dumps({"machine": machine(), "rows": rows}, indent=1))
    lines = [f"# {name}", "", notes, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    lines += ["", f"machine: {json.dumps(machine())}", ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        if 0 < abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def run_child(script: str, args: list[str], label: str) -> dict:
    """Run `script --one ...` in a fresh process (clean timings and peak memory) and return
    the row it prints as `RESULT {json}`."""
    import subprocess
    import sys

    # stdout carries the result; stderr (progress bars, logs) goes straight to ours, so a long
    # child shows what it is doing while it runs
    out = subprocess.run([sys.executable, script, *args], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        print(out.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"{label} failed (exit {out.returncode})")
    row = json.loads(line[0][7:])
    print(row, flush=True)
    return row


def save_figure(fig, path: Path, title: str) -> Path:
    """Title, lay out and write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    from kedit_core.io import atomic_file

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
