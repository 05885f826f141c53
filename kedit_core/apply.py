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


class DeltaApplier:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.originals: dict[str, torch.Tensor] = {}

    def apply(self, deltas: Iterable[WeightDelta]) -> None:
        arch, model = self.lm.arch, self.lm.model
        for d in deltas:
            w = arch.weight(model, d.site)
            if d.site not in self.originals:
                self.originals[d.site] = w.detach().clone()
            m = d.matrix().to(device=w.device, dtype=torch.float32)
            with torch.no_grad():
                w.copy_((w.float() + arch.from_out_in(m)).to(w.dtype))

    def revert(self) -> None:
        arch, model = self.lm.arch, self.lm.model
        with torch.no_grad():
            for site, orig in self.originals.items():
                arch.weight(model, site).copy_(orig)
        self.originals.clear()

    def cumulative(self) -> list[WeightDelta]:
        """Current weights minus originals, per touched site, as dense (out, in) deltas."""
        arch, model = self.lm.arch, self.lm.model
        return [WeightDelta(site, dense=arch.as_out_in(arch.weight(model, site).detach().float()
                                                       - orig.float()).contiguous())
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
