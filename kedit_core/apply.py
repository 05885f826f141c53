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
    """deltas.safetensors (factored where they are) + config.json, each written atomically;
    config.json records the sha256 of the deltas file it belongs to (`deltas_sha256`), so a
    pair that does not belong together (a crash between the two renames, a file copied from
    elsewhere) is refused by `load_deltas`."""
    from kedit_core.io import atomic_file, atomic_write_text, sha256_file

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
    target = directory / "deltas.safetensors"
    with atomic_file(target) as tmp:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
    atomic_write_text(directory / "config.json", json.dumps({**config, "deltas_sha256": digest}, indent=1,
                                                           default=str))
    return directory


def load_deltas(directory: str | Path) -> tuple[list[WeightDelta], dict]:
    """The deltas and their config (without `deltas_sha256`), verified to belong together."""
    from kedit_core.io import sha256_file

    directory = Path(directory)
    f = directory / "deltas.safetensors"
    try:
        config = json.loads((directory / "config.json").read_text())
        digest = config.pop("deltas_sha256", None)
        if digest is not None and sha256_file(f) != digest:
            raise BadInputError("deltas.safetensors does not match the sha256 its config.json records "
                                "(the pair does not belong together)", file=str(f), field="deltas_sha256")
        tensors = load_file(str(f))
    except FileNotFoundError as e:
        raise BadInputError("no deltas here (deltas.safetensors and config.json)", file=str(directory)) from e
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise BadInputError(f"unreadable deltas ({e})", file=str(f)) from e
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, site, kind = key.split(":")
        parts.setdefault((int(idx), site), {})[kind] = t
    deltas = [WeightDelta(site, left=p.get("left"), right=p.get("right"), dense=p.get("dense"))
              for (_, site), p in sorted(parts.items())]
    return deltas, config
