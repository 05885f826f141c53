"""The statistics store: second moments as safetensors with their identity in the header.

A file's name is a hash of everything that determines its content (model weights hash,
site, corpus hash, sample count, truncation length, dtype), so a statistic is reused exactly
when it matches and recomputed when anything differs; the header is checked on every read,
so a renamed or damaged file is refused, never silently mixed in. Writes are atomic (temp
file + fsync + rename). AlphaEdit's null-space projectors are cached beside their moment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kedit_core.errors import BadInputError
from kedit_core.linalg import nullspace_projector
from kedit_core.models.loader import LoadedModel, cache_dir
from kedit_core.stats.corpus import Corpus
from kedit_core.stats.moments import SecondMoment, collect_sharded, tokenize_corpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsSpec:
    """The identity of one statistic."""

    model_hash: str
    site: str
    corpus_hash: str
    n_samples: int | None       # texts used (None: the whole corpus)
    max_length: int             # tokens per text
    dtype: str = "float64"
    kind: str = "mom2"
    # Labels for people; not part of the identity.
    model: str = ""
    corpus_id: str = ""

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("model"), d.pop("corpus_id")
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:24]

    def filename(self) -> str:
        layer = self.site.replace(".", "_")
        return f"{self.kind}-{layer}-{self.digest()}.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """safetensors written atomically (kedit_core.io.atomic_file: unique temp name, fsync,
    rename, fsync of the directory)."""
    from kedit_core.io import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: a statistics entry's content checksum."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"corrupt statistics file ({e}); delete it to recompute",
                            file=str(path)) from e


class StatsStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "stats"

    def path(self, spec: StatsSpec) -> Path:
        return self.root / spec.filename()

    # ---------------------------------------------------------------- moments
    def load(self, spec: StatsSpec) -> SecondMoment | None:
        """The stored moment, verified: identity (the name's content), the content checksum
        and the token count of the header must all hold, else the entry is refused with a
        one-line error (never used). An entry written before checksums existed is treated as
        absent (recomputed) with a warning."""
        p = self.path(spec)
        if not p.is_file():
            return None
        tensors, meta = _read(p)
        try:
            stored = json.loads(meta.get("identity", "null") or "null")
        except json.JSONDecodeError:
            stored = None
        if stored != spec.identity():
            diff = sorted(k for k in spec.identity() if (stored or {}).get(k) != spec.identity()[k])
            raise BadInputError(f"statistics file does not match its name (differs in {', '.join(diff)}); "
                                "it was renamed or damaged: delete it to recompute", file=str(p))
        if "sha256" not in meta:
            log.warning("%s has no content checksum (written by an older kedit); recomputing it", p)
            return None
        if "sum" not in tensors or tensor_sha256(tensors["sum"]) != meta["sha256"]:
            raise BadInputError("statistics file does not match its content checksum (damaged or "
                                "overwritten); delete it to recompute", file=str(p), field="sha256")
        try:
            count, texts, tokens = int(meta["count"]), int(meta["texts"]), int(meta["tokens"])
        except (KeyError, ValueError) as e:
            raise BadInputError("statistics file lacks its text / token counts; delete it to recompute",
                                file=str(p), field="count") from e
        if count != tokens or count <= 0 or texts <= 0:
            raise BadInputError(f"statistics file records {count} tokens but {tokens} were counted over "
                                f"{texts} texts; delete it to recompute", file=str(p), field="count")
        return SecondMoment(tensors["sum"], count, texts)

    def save(self, spec: StatsSpec, moment: SecondMoment, *, n_texts: int | None = None, **extra: str) -> Path:
        p = self.path(spec)
        texts = n_texts if n_texts is not None else moment.texts
        if not texts or moment.count <= 0:
            raise ValueError(f"refusing to store an empty statistic for {spec.site} ({texts} texts, "
                             f"{moment.count} tokens)")
        meta = {"identity": json.dumps(spec.identity(), sort_keys=True), "count": str(moment.count),
                "texts": str(int(texts)), "tokens": str(moment.count), "sha256": tensor_sha256(moment.sum),
                "model": spec.model, "corpus_id": spec.corpus_id, "created": str(time.time()),
                **{k: str(v) for k, v in extra.items()}}
        _atomic_save({"sum": moment.sum}, meta, p)
        moment.texts = int(texts)
        return p

    def lock(self, specs) -> "FileLock":
        """The lock of a group of entries: held while one process computes and saves them, so
        two jobs for the same entry (a sweep starts them by the dozen) never interleave; the
        second waits, then finds the entry stored."""
        from kedit_core.io import FileLock

        key = hashlib.sha256(json.dumps(sorted(s.digest() for s in specs)).encode()).hexdigest()[:24]
        return FileLock(self.root / "locks" / f"{key}.lock")

    def specs(self, lm: LoadedModel, sites, corpus: Corpus, *, n_samples: int | None,
              max_length: int) -> dict[str, StatsSpec]:
        chash = corpus.content_hash()
        return {s: StatsSpec(model_hash=lm.fingerprint(), site=s, corpus_hash=chash,
                             n_samples=n_samples, max_length=max_length, model=lm.name,
                             corpus_id=corpus.id) for s in sites}

    def get_or_compute(self, lm: LoadedModel, sites, corpus: Corpus, *, n_samples: int | None = 2000,
                       max_length: int = 128, batch_tokens: int = 4096,
                       show_progress: bool = True) -> dict[str, SecondMoment]:
        """The moments of `sites`: read where stored, the missing ones computed together in
        one pass over the corpus and stored."""
        specs = self.specs(lm, sites, corpus, n_samples=n_samples, max_length=max_length)
        out = {s: self.load(spec) for s, spec in specs.items()}
        missing = [s for s, m in out.items() if m is None]
        if not missing:
            return out
        with self.lock([specs[s] for s in missing]):
            # another process may have stored them while this one waited for the lock
            for s in missing:
                out[s] = self.load(specs[s])
            missing = [s for s, m in out.items() if m is None]
            if missing:
                log.info("computing second moments for %s on %s (%s texts, %d tokens each at most)",
                         ", ".join(missing), corpus.id, n_samples or "all", max_length)
                token_lists = tokenize_corpus(lm, corpus.texts(), max_length=max_length, n_samples=n_samples)
                computed = self.compute(lm, missing, token_lists, batch_tokens=batch_tokens,
                                        show_progress=show_progress)
                for s in missing:
                    self.save(specs[s], computed[s], n_texts=len(token_lists))
                    out[s] = computed[s]
        return out

    @staticmethod
    def compute(lm: LoadedModel, sites, token_lists, *, batch_tokens: int = 4096,
                show_progress: bool = True) -> dict[str, SecondMoment]:
        from tqdm.auto import tqdm

        total = sum(len(t) for t in token_lists)
        t0 = time.perf_counter()
        with tqdm(total=total, unit="tok", unit_scale=True, desc="second moments",
                  disable=not show_progress) as bar:
            moments = collect_sharded(
                lm, sites, token_lists, batch_tokens=batch_tokens,
                progress=lambda n, _: bar.update(n))
        dt = time.perf_counter() - t0
        log.info("second moments: %d tokens in %.1fs (%.0f tokens/s)", total, dt, total / max(dt, 1e-9))
        return moments

    # ---------------------------------------------------------------- projectors
    def projector(self, spec: StatsSpec, moment: SecondMoment, threshold: float,
                  device: torch.device | None = None) -> torch.Tensor:
        """AlphaEdit's null-space projector of E[k k^T] (eigenvalues < threshold), cached;
        computed on `device` when given (kedit_core.linalg.linalg_device), returned on the CPU."""
        pspec = StatsSpec(**{**asdict(spec), "kind": f"proj{threshold:g}"})
        p = self.path(pspec)
        if p.is_file():
            tensors, meta = _read(p)
            if (json.loads(meta.get("identity", "null")) == pspec.identity() and "P" in tensors
                    and meta.get("sha256") == tensor_sha256(tensors["P"])):
                return tensors["P"]
            log.warning("recomputing the projector %s (stale or damaged)", p)
        P, rank = nullspace_projector(moment.mean(), threshold, device=device)
        _atomic_save({"P": P}, {"identity": json.dumps(pspec.identity(), sort_keys=True),
                                "rank": str(rank), "threshold": str(threshold), "sha256": tensor_sha256(P)}, p)
        log.info("null-space projector for %s: rank %d of %d (threshold %g)", spec.site, rank,
                 P.shape[0], threshold)
        return P


class StatsView:
    """What a method's `prepare` sees: `view[site]` -> SecondMoment, and
    `view.projector(site, threshold)` -> AlphaEdit's projector (cached in the store when
    there is one)."""

    def __init__(self, moments: dict[str, SecondMoment], store: StatsStore | None = None,
                 specs: dict[str, StatsSpec] | None = None):
        self.moments, self.store, self.specs = moments, store, specs or {}

    def __getitem__(self, site: str) -> SecondMoment:
        return self.moments[site]

    def projector(self, site: str, threshold: float, device: torch.device | None = None) -> torch.Tensor:
        if self.store is not None and site in self.specs:
            return self.store.projector(self.specs[site], self.moments[site], threshold, device=device)
        return nullspace_projector(self.moments[site].mean(), threshold, device=device)[0]
