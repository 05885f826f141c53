"""Applying, reverting, saving and loading weight deltas.

Methods never change the model; they return `WeightDelta`s. `DeltaApplier` applies them and
keeps a copy of every weight it touched as it was before the first change, so `revert()`
restores the original bits exactly (adding and then subtracting a float delta would not).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kedit_core.errors import BadInputError
from kedit_core.models.loader import LoadedModel
from kedit_core.types import WeightDelta


@contextlib.contextmanager
def full_weights(lm: LoadedModel, sites: Iterable[str], *, modify: bool = False
                 ) -> Iterator[dict[str, torch.nn.Parameter]]:
    """{site: weight parameter} with its full value inside the block. For a ZeRO-3 model the
    partitions are gathered (and, with `modify`, what is written is partitioned again on
    exit); otherwise the parameters are yielded as they are. Every read or write of an edited
    weight goes through here."""
    params = {s: lm.arch.weight(lm.model, s) for s in dict.fromkeys(sites)}
    if not lm.zero3:
        yield params
        return
    from kedit_core.models.zero3 import gathered

    with gathered(list(params.values()), modify):
        yield params


def read_weights(lm: LoadedModel, sites: Iterable[str], device: str | None = None) -> dict[str, torch.Tensor]:
    """Copies of the sites' current weights (on `device`, or where they are)."""
    with full_weights(lm, sites) as ws:
        return {s: w.detach().to(device or w.device).clone() for s, w in ws.items()}


def write_weights(lm: LoadedModel, weights: dict[str, torch.Tensor]) -> None:
    """Set the sites' weights to these values (cast to each parameter's device and dtype)."""
    with full_weights(lm, weights, modify=True) as ws, torch.no_grad():
        for s, w in ws.items():
            w.copy_(weights[s].to(w.device, w.dtype))


class DeltaApplier:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.originals: dict[str, torch.Tensor] = {}

    def apply(self, deltas: Iterable[WeightDelta]) -> None:
        deltas = list(deltas)
        arch = self.lm.arch
        with full_weights(self.lm, [d.site for d in deltas], modify=True) as ws:
            for d in deltas:
                w = ws[d.site]
                if d.site not in self.originals:
                    self.originals[d.site] = w.detach().clone()
                m = d.matrix().to(device=w.device, dtype=torch.float32)
                with torch.no_grad():
                    w.copy_((w.float() + arch.from_out_in(m)).to(w.dtype))

    def revert(self) -> None:
        write_weights(self.lm, self.originals)
        self.originals.clear()

    def cumulative(self) -> list[WeightDelta]:
        """Current weights minus originals, per touched site, as dense (out, in) deltas."""
        arch = self.lm.arch
        with full_weights(self.lm, self.originals) as ws:
            return [WeightDelta(site, dense=arch.as_out_in(ws[site].detach().float() - orig.float()).contiguous())
                    for site, orig in self.originals.items()]


@contextlib.contextmanager
def temporarily_applied(lm: LoadedModel, deltas: Sequence[WeightDelta] = ()) -> Iterator[DeltaApplier]:
    """Apply deltas (and whatever is applied to the yielded applier inside the block);
    restore the original bits on exit, also after an exception."""
    app = DeltaApplier(lm)
    try:
        app.apply(deltas)
        yield app
    finally:
        app.revert()


def save_deltas(directory: str | Path, deltas: Sequence[WeightDelta], config: dict) -> Path:
    """deltas.safetensors (factored where they are) + config.json, written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, d in enumerate(deltas):
        key = f"{i:04d}:{d.site}"
        if d.dense is not None:
            tensors[f"{key}:dense"] = d.dense.detach().cpu().contiguous()
        else:
            tensors[f"{key}:left"] = d.left.detach().cpu().contiguous()
            tensors[f"{key}:right"] = d.right.detach().cpu().contiguous()
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, directory / "deltas.safetensors")
    (directory / "config.json.tmp").write_text(json.dumps(config, indent=1, default=str))
    os.replace(directory / "config.json.tmp", directory / "config.json")
    return directory


def load_deltas(directory: str | Path) -> tuple[list[WeightDelta], dict]:
    directory = Path(directory)
    f = directory / "deltas.safetensors"
    try:
        tensors = load_file(str(f))
        config = json.loads((directory / "config.json").read_text())
    except FileNotFoundError as e:
        raise BadInputError("no deltas here (deltas.safetensors and config.json)", file=str(directory)) from e
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise BadInputError(f"unreadable deltas ({e})", file=str(f)) from e
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, site, kind = key.split(":")
        parts.setdefault((int(idx), site), {})[kind] = t
    deltas = [WeightDelta(site, left=p.get("left"), right=p.get("right"), dense=p.get("dense"))
              for (_, site), p in sorted(parts.items())]
    return deltas, config
