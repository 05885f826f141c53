"""Checkpoints of an edit stream, written atomically and verified on read.

RUN_DIR/checkpoints/ckpt-00000120/ holds, after 120 edits:
  weights.safetensors   the edited sites' weights, bit-exact (the cumulative edit relative
                        to the original model, whose hash is in state.json; `kedit export
                        --deltas-only` turns it into deltas)
  state.safetensors     the method's sequential state tensors (AlphaEdit's K_p K_p^T)
  state.json            cursor (edits and batches done), RNG states, config identity and its
                        hash, metrics so far, per-batch records, the locality baseline
  manifest.json         sha256 and size of every file above; written last

A checkpoint is built in a temporary directory (files fsynced), renamed into place (atomic
on POSIX) and the parent directory fsynced, so a `kill -9` at any moment leaves either the
previous set of checkpoints or the new one. On read the manifest's checksums are verified;
a damaged or partial checkpoint is skipped with a warning and the one before it is used.
The last `keep` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PREFIX = "ckpt-"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file atomically (kedit_core.io: temp file in the same directory, fsync,
    rename, fsync of the directory)."""
    from kedit_core.io import atomic_write_text as _write

    _write(path, text)


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, torch.Tensor]
    state_tensors: dict[str, torch.Tensor]
    state: dict

    @property
    def n_edits(self) -> int:
        return int(self.state["cursor"]["edits"])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def list(self) -> list[Path]:
        """Complete checkpoint directories (by name), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                      and p.name[len(PREFIX):].isdigit())

    def save(self, n_edits: int, weights: dict[str, torch.Tensor], state_tensors: dict[str, torch.Tensor],
             state: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{PREFIX}{n_edits:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{final.name}-"))
        try:
            files = {
                "weights.safetensors": lambda p: save_file({k: v.detach().cpu().contiguous()
                                                            for k, v in weights.items()}, str(p)),
                "state.safetensors": lambda p: save_file({k: v.detach().cpu().contiguous()
                                                          for k, v in state_tensors.items()}, str(p)),
                "state.json": lambda p: p.write_text(json.dumps(state, indent=1, default=_jsonable)),
            }
            manifest = {"n_edits": n_edits, "files": {}}
            for name, write in files.items():
                write(tmp / name)
                _fsync(tmp / name)
                manifest["files"][name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync(tmp / "manifest.json")
            _fsync(tmp)
            if final.exists():  # a checkpoint of the same step (a resumed run redoing it): replace
                old = self.root / f".old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        done = self.list()
        for p in done[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():  # leftovers of an interrupted save
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> str | None:
        """None when the checkpoint is complete and its checksums match, else why not."""
        mf = path / "manifest.json"
        try:
            manifest = json.loads(mf.read_text())
        except FileNotFoundError:
            return "no manifest.json (incomplete)"
        except json.JSONDecodeError:
            return "manifest.json is not valid JSON"
        for name, meta in manifest.get("files", {}).items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                return f"{name} does not match its sha256"
        if set(manifest.get("files", {})) != {"weights.safetensors", "state.safetensors", "state.json"}:
            return "manifest lists the wrong files"
        return None

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
        for path in reversed(self.list()):
            why = self.verify(path)
            if why:
                log.warning("checkpoint %s is damaged (%s); using the one before it", path, why)
                continue
            return Checkpoint(path, load_file(str(path / "weights.safetensors")),
                              load_file(str(path / "state.safetensors")),
                              json.loads((path / "state.json").read_text()))
        return None


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes of tensors (sorted by name): the weights' identity."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
