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
import time
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


# ------------------------------------------------------------------ a batch in progress
class BatchPartial:
    """The chunk log (kedit_core.methods.common.ChunkLog) of the batch in progress, on disk,
    so that a batch killed after hours of target optimisation resumes with only the chunks
    not done. RUN_DIR/partial/ holds

      batch.json                    the batch's identity (run identity hash, batch index, the
                                    edited weights' hash at its start) and its chunk layout
      targets-00012.{json,safetensors}   chunk 12's target vectors, losses, steps (written
                                    once per chunk, as soon as it is optimised)
      sums-1.{json,safetensors}     the running sums K K^T, K R^T of the pass over edited
                                    layer 1 and how many chunks they cover (at most every
                                    `every_s` seconds, and when the pass is complete)

    Each record is a safetensors file named by its content's sha256 and a JSON file written
    after it (atomically) that names it and holds its sha256: a reader sees the previous
    record or the new one, and verifies the checksum (a damaged record is ignored with a
    warning, its chunks are recomputed). A log of another batch (another identity) is
    discarded when a batch starts; `clear()` removes it once the batch is checkpointed.
    Chunks whose targets were saved but whose sums were not need only a key pass on resume.
    """

    def __init__(self, run_dir: str | Path, key: dict, every_s: float = 60.0):
        self.root = Path(run_dir) / "partial"
        self.key = json.loads(json.dumps(key, sort_keys=True))
        self.every_s = every_s
        self.bounds = None
        self._last: dict[int, float] = {}
        self.resumed = {"sums": {}, "targets": 0}

    # -------------------------------------------------------------- the ChunkLog interface
    def start(self, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
        from kedit_core.io import atomic_write_json

        saved = self._read_json(self.root / "batch.json")
        if saved is not None and saved.get("key") == self.key:
            self.bounds = [tuple(b) for b in saved["bounds"]]
            self.resumed["targets"] = sum(self.has_targets(j) for j in range(len(self.bounds)))
            log.info("batch %s: resuming its chunk log (%d chunks, %d with targets)", self.key.get("batch"),
                     len(self.bounds), self.resumed["targets"])
            return self.bounds
        if self.root.exists():
            if saved is not None:
                log.info("discarding the chunk log of another batch (%s)", saved.get("key", {}).get("batch"))
            shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bounds = [tuple(b) for b in bounds]
        atomic_write_json(self.root / "batch.json", {"key": self.key, "bounds": self.bounds}, indent=1)
        return self.bounds

    def has_targets(self, j: int) -> bool:
        return (self.root / f"targets-{j:05d}.json").is_file() and self._read(f"targets-{j:05d}") is not None

    def get_targets(self, j: int):
        from kedit_core.zopt import ZResult

        rec = self._read(f"targets-{j:05d}")
        if rec is None:
            return None
        t, meta = rec
        return ZResult(targets=t["targets"], init=t["init"], losses=meta["losses"], steps=meta["steps"])

    def get_losses(self, j: int) -> tuple[list, list]:
        meta = self._read_json(self.root / f"targets-{j:05d}.json")["meta"]
        return meta["losses"], meta["steps"]

    def put_targets(self, j: int, z) -> None:
        self._write(f"targets-{j:05d}", {"targets": z.targets, "init": z.init},
                    {"losses": list(z.losses), "steps": list(z.steps)})

    def get_sums(self, i: int):
        rec = self._read(f"sums-{i}")
        if rec is None:
            return None
        t, meta = rec
        self.resumed["sums"][i] = meta["done"]
        return meta["done"], t["KK"], t["KR"]

    def put_sums(self, i: int, done: int, KK: torch.Tensor, KR: torch.Tensor) -> None:
        now = time.monotonic()
        complete = done == len(self.bounds)
        if not complete and now - self._last.setdefault(i, now) < self.every_s:
            return
        self._write(f"sums-{i}", {"KK": KK, "KR": KR}, {"done": done})
        self._last[i] = time.monotonic()

    def all_targets(self):
        return None   # on disk; never materialised for the whole batch

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -------------------------------------------------------------- records
    def _write(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from kedit_core.io import atomic_file, atomic_write_json

        tmp = self.root / f".{name}.building.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
        final = self.root / f"{name}-{digest[:16]}.safetensors"
        with atomic_file(final) as p:
            os.replace(tmp, p)
        atomic_write_json(self.root / f"{name}.json", {"file": final.name, "sha256": digest,
                                                        "bytes": final.stat().st_size, "meta": meta,
                                                        "key": self.key}, indent=1)
        for old in self.root.glob(f"{name}-*.safetensors"):   # the records this one replaces
            if old != final:
                old.unlink(missing_ok=True)

    def _read(self, name: str):
        rec = self._read_json(self.root / f"{name}.json")
        if rec is None:
            return None
        f = self.root / str(rec.get("file", ""))
        if rec.get("key") != self.key:
            why = "it belongs to another batch"
        elif not f.is_file():
            why = f"{f.name} is missing"
        elif f.stat().st_size != rec.get("bytes") or sha256_file(f) != rec.get("sha256"):
            why = f"{f.name} does not match its sha256"
        else:
            return load_file(str(f)), rec["meta"]
        log.warning("chunk record %s is unusable (%s); its chunks are recomputed", self.root / f"{name}.json", why)
        return None

    @staticmethod
    def _read_json(path: Path):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            log.warning("unreadable chunk record %s; ignored", path)
            return None
