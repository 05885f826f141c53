"""The retrieval memory shared by the memory family (IKE, MemPrompt, MeLLo, SERAC).

Edits are stored as text (`MemoryEntry`) with the sentence embedding of their key
(kedit_core.encoder, all-MiniLM-L6-v2). `search` returns the top-k entries by cosine
similarity:

* `index="exact"` (default): one matrix product against all embeddings, on the encoder's
  device (CPU or GPU); exact, O(n d) per query - 10^5 entries x 384 dims is ~40M
  multiply-adds per query, milliseconds;
* `index="faiss-hnsw"`: an approximate HNSW graph index (faiss, `pip install faiss-cpu`) for
  millions of edits, rebuilt from the stored embeddings on load; `index="faiss-flat"`: faiss's
  exact inner-product index.

The state is the entries (JSON) and the embeddings (safetensors, exact bits), so a resumed
stream holds exactly the memory it had (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from kedit_core.errors import BadInputError
from kedit_core.types import MemoryEntry

INDEXES = ("exact", "faiss-flat", "faiss-hnsw")


class EditMemory:
    def __init__(self, encoder=None, *, index: str = "exact", encoder_spec: str | None = None):
        if index not in INDEXES:
            raise BadInputError(f"unknown memory index {index!r} (choose {', '.join(INDEXES)})", field="memory_index")
        self._encoder = encoder
        self.encoder_spec = encoder_spec or getattr(encoder, "spec", "all-minilm-l6-v2")
        self.index = index
        self.entries: list[MemoryEntry] = []
        self.emb: torch.Tensor | None = None
        self._faiss = None

    @property
    def encoder(self):
        if self._encoder is None:
            from kedit_core.encoder import load_encoder

            self._encoder = load_encoder(self.encoder_spec)
        return self._encoder

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: Sequence[MemoryEntry]) -> None:
        entries = list(entries)
        if not entries:
            return
        e = self.encoder.encode([x.key for x in entries])
        self.emb = e if self.emb is None else torch.cat([self.emb, e])
        self.entries += entries
        self._faiss = None

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode(list(texts))

    def search(self, queries: Sequence[str] | torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (q, k'), cosine scores (q, k')) of the k nearest entries per query, best
        first; k' = min(k, len(memory)). Ties break by insertion order."""
        q = queries if isinstance(queries, torch.Tensor) else self.embed(queries)
        if not self.entries:
            return torch.zeros(len(q), 0, dtype=torch.long), torch.zeros(len(q), 0)
        k = min(k, len(self.entries))
        if self.index == "exact":
            sims = q.to(self.emb.device) @ self.emb.T
            # stable: equal scores keep insertion order
            order = torch.sort(sims, dim=1, descending=True, stable=True)
            return order.indices[:, :k].cpu(), order.values[:, :k].cpu()
        index = self._faiss_index()
        scores, idx = index.search(q.numpy().astype("float32"), k)
        return torch.from_numpy(idx).long(), torch.from_numpy(scores).float()

    def _faiss_index(self):
        if self._faiss is None:
            try:
                import faiss
            except ImportError as e:
                raise BadInputError(f"memory index {self.index} needs faiss (pip install faiss-cpu)",
                                    field="memory_index") from e
            d = self.emb.shape[1]
            if self.index == "faiss-flat":
                idx = faiss.IndexFlatIP(d)
            else:
                idx = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
                idx.hnsw.efSearch = 128
            idx.add(self.emb.numpy().astype("float32"))
            self._faiss = idx
        return self._faiss

    # ---------------------------------------------------------------- state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"memory.embeddings": self.emb.contiguous()} if self.emb is not None else {}
        meta = {"entries": [e.to_json() for e in self.entries], "encoder": self.encoder_spec,
                "index": self.index, "digest": self.digest()}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.entries = [MemoryEntry.from_json(d) for d in meta.get("entries", [])]
        self.emb = tensors.get("memory.embeddings")
        self.encoder_spec = meta.get("encoder", self.encoder_spec)
        self._faiss = None
        if (self.emb is None) != (not self.entries) or (self.emb is not None and len(self.emb) != len(self.entries)):
            raise BadInputError("memory state: entries and embeddings disagree", field="memory")
        if meta.get("digest") and meta["digest"] != self.digest():
            raise BadInputError("memory state does not match its digest", field="memory")

    def digest(self) -> str:
        """sha256 over the entries' text and the embeddings' bytes: the memory's identity."""
        h = hashlib.sha256()
        for e in self.entries:
            h.update(repr(e.to_json()).encode())
        if self.emb is not None:
            h.update(self.emb.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
