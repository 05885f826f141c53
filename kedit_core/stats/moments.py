"""Mergeable uncentered second moments E[k k^T], collected for many layers in ONE pass.

The reference `layer_stats` (ROME/MEMIT) runs one truncated forward pass per layer; here one
pass hooks the input of every requested MLP output projection and stops after the deepest
one, so the cost is that of the deepest layer alone. Each batch's k^T k is formed in the
activation dtype (float32) and added to a float64 accumulator with the token count, so a
partial result (sum, count) merges with another exactly up to float64 rounding: shards
can be computed anywhere (Ray actors) and combined.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence  # noqa: F401
from dataclasses import dataclass

import torch

from kedit_core.batching import batches_by_tokens, pad_id, pad_right
from kedit_core.hooks import run_until_stopped, trace
from kedit_core.models.loader import LoadedModel


# Texts per shard. The single-process store and the Ray stats job both cut the token lists
# into shards of this many texts (in corpus order), compute each shard separately and merge
# them in shard order, so the two give the same sums.
SHARD_TEXTS = 256


@dataclass
class SecondMoment:
    """sum of k k^T (float64, d x d) over `count` tokens."""

    sum: torch.Tensor
    count: int = 0
    texts: int | None = None     # texts the sum came from (recorded by the store)

    @classmethod
    def zeros(cls, d: int, device: torch.device | str | None = None) -> "SecondMoment":
        return cls(torch.zeros(d, d, dtype=torch.float64, device=device), 0)

    def update(self, k: torch.Tensor) -> None:
        """Add the rows of k (n, d): k^T k formed on k's device in float32 (exactly so for
        half-precision keys, module `gram`), added to the float64 sum."""
        if k.shape[0] == 0:
            return
        self.sum += gram(k.detach()).to(device=self.sum.device, dtype=torch.float64)
        self.count += int(k.shape[0])

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge moments of shapes {tuple(self.sum.shape)} and {tuple(other.sum.shape)}")
        return SecondMoment(self.sum + other.sum.to(self.sum.device), self.count + other.count)

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.sum / self.count


def gram(k: torch.Tensor) -> torch.Tensor:
    """k^T k in float32 (float64 for float64 k). Keys of a bf16 / fp16 model are exact in
    TF32 (8-bit exponent, 10-bit mantissa: bf16 has 7 mantissa bits, fp16 10 and a 5-bit
    exponent), so on a GPU their product runs on the tensor cores in TF32 with float32
    accumulation and loses nothing against a full float32 product; float32 keys of a float32
    model keep the full-precision product."""
    if k.dtype == torch.float64:
        return k.T @ k
    if k.dtype in (torch.bfloat16, torch.float16) and k.is_cuda:
        kf = k.float()
        with _tf32_matmul():
            return kf.T @ kf
    kf = k if k.dtype == torch.float32 else k.float()
    return kf.T @ kf


class _tf32_matmul:
    """CUDA matmuls in TF32 inside the block (restores the setting after)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def merge_all(parts: Iterable[dict[str, SecondMoment]]) -> dict[str, SecondMoment]:
    out: dict[str, SecondMoment] = {}
    for part in parts:
        for site, m in part.items():
            out[site] = m if site not in out else out[site].merge(m)
    return out


@torch.no_grad()
def collect_second_moments(lm: LoadedModel, sites: Sequence[str], token_lists: Sequence[list[int]],
                           *, batch_tokens: int = 4096,
                           progress: Callable[[int, int], None] | None = None
                           ) -> dict[str, SecondMoment]:
    """E[k k^T] of the input of each site (an MLP output projection), over the tokens of
    `token_lists` (already tokenised and truncated), in one forward pass per batch that
    stops after the deepest site. Padding tokens never count.

    `progress(n_tokens, n_sequences)` is called after each batch."""
    model, arch = lm.model, lm.arch
    modules = {s: arch.module(model, s) for s in sites}
    deepest = max(sites, key=lambda s: int(s.split(".")[1]))
    # the float64 sums live on the model's device (a GPU adds each batch's d x d product where
    # it was formed, instead of copying it to the host) and come back to the CPU at the end
    moments = {s: SecondMoment.zeros(arch.dims(model, s)[1], device=lm.device) for s in sites}
    pad = pad_id(lm.tokenizer)
    mask_ref: dict[str, torch.Tensor] = {}

    def on_input(site: str, x: torch.Tensor) -> None:
        moments[site].update(x[mask_ref["mask"]])

    with trace(modules, inputs=True, outputs=False, stop_after=deepest, on_input=on_input):
        for idx in batches_by_tokens(token_lists, batch_tokens):
            seqs = [token_lists[i] for i in idx]
            ids, mask = pad_right(seqs, pad, lm.device)
            mask_ref["mask"] = mask.bool()
            run_until_stopped(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
            if progress:
                progress(int(mask.sum()), len(seqs))
    for m in moments.values():
        m.sum = m.sum.cpu()
    return moments


def collect_sharded(lm: LoadedModel, sites: Sequence[str], token_lists: Sequence[list[int]], *,
                    batch_tokens: int = 4096, progress: Callable[[int, int], None] | None = None,
                    shard_texts: int = SHARD_TEXTS) -> dict[str, SecondMoment]:
    """collect_second_moments shard by shard (SHARD_TEXTS texts each), merged in order."""
    parts = [collect_second_moments(lm, sites, token_lists[i:i + shard_texts], batch_tokens=batch_tokens,
                                    progress=progress)
             for i in range(0, len(token_lists), shard_texts)]
    return merge_all(parts)


def tokenize_corpus(lm: LoadedModel, texts: Iterable[str], *, max_length: int = 128,
                    n_samples: int | None = None) -> list[list[int]]:
    """Token ids of up to `n_samples` texts, each truncated to `max_length` tokens (texts of
    fewer than 2 tokens are skipped). When `texts` is a whole corpus (`Corpus.texts()`, which
    carries `source`), a corpus with no usable text raises `BadInputError` naming it and field
    stats_corpus, rather than yielding statistics of zero tokens; other iterables (a held-out
    tail for perplexity, a list) may come out empty."""
    out = []
    tok = lm.tokenizer
    seen = 0
    for text in texts:
        if n_samples is not None and len(out) >= n_samples:
            break
        seen += 1
        ids = tok(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            out.append(ids)
    if not out and n_samples != 0 and getattr(texts, "source", None) is not None:
        from kedit_core.stats.corpus import no_usable_text

        raise no_usable_text(getattr(texts, "source", None), f"; {seen} text(s) read")
    return out


def throughput(n_tokens: int, t0: float) -> float:
    return n_tokens / max(time.perf_counter() - t0, 1e-9)
