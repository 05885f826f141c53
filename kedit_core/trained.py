"""Trained-editor artifacts (MEND, KnowledgeEditor, SERAC): what `kedit train` writes and
what `--editor DIR` reads.

    DIR/editor.safetensors   the editor's tensors
    DIR/editor.json          {"method", "base_model", "base_fingerprint", "config", "data",
                              "split", "steps", "metrics", "tensors_sha256", "digest"}

`digest` is the sha256 of the tensors' file hash and the canonical JSON of everything else:
the artifact's identity (content-addressed; a stream's checkpoints record it). Reading
verifies both hashes, the method, and the base model's fingerprint: an editor trained for
other weights is refused with one line naming the file and field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kedit_core.errors import BadInputError
from kedit_core.io import atomic_dir, sha256_file

TENSORS, META = "editor.safetensors", "editor.json"


def _digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def save_artifact(out: str | Path, method: str, tensors: dict[str, torch.Tensor], *, base_model: str,
                  base_fingerprint: str, config: dict, data: dict | None = None, split: dict | None = None,
                  steps: int = 0, metrics: dict | None = None) -> str:
    """Write the artifact atomically (a directory swap); returns its digest. An existing
    artifact with other content is not overwritten."""
    from safetensors.torch import save_file

    out = Path(out)
    if (out / META).is_file():
        raise BadInputError("already holds a trained editor; choose another --out", file=str(out / META))
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        meta = {"method": method, "base_model": base_model, "base_fingerprint": base_fingerprint,
                "config": config, "data": data or {}, "split": split or {}, "steps": int(steps),
                "metrics": metrics or {}, "tensors_sha256": sha256_file(tmp / TENSORS)}
        meta["digest"] = _digest(meta)
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return meta["digest"]


def load_artifact(path: str | Path, *, method: str | None = None, fingerprint: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a verified artifact."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META).is_file() and (path / "editor" / META).is_file():
        path = path / "editor"              # a `kedit train --out` directory
    mfile, tfile = path / META, path / TENSORS
    if not mfile.is_file() or not tfile.is_file():
        raise BadInputError(f"is not a trained editor (needs {META} and {TENSORS}; train one with `kedit train`)",
                            file=str(path), field="editor")
    try:
        meta = json.loads(mfile.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"unreadable ({e})", file=str(mfile)) from None
    if meta.get("digest") != _digest(meta):
        raise BadInputError("damaged: its digest does not match its contents", file=str(mfile), field="digest")
    if sha256_file(tfile) != meta.get("tensors_sha256"):
        raise BadInputError("damaged: the tensors' sha256 differs from editor.json", file=str(tfile),
                            field="tensors_sha256")
    if method is not None and meta.get("method") != method:
        raise BadInputError(f"holds a {meta.get('method')!r} editor, not {method!r}", file=str(mfile), field="method")
    if fingerprint is not None and meta.get("base_fingerprint") != fingerprint:
        raise BadInputError(f"was trained for other base weights ({meta.get('base_model')}, fingerprint "
                            f"{str(meta.get('base_fingerprint'))[:12]}) than the model being edited "
                            f"({fingerprint[:12]})", file=str(mfile), field="base_fingerprint")
    return load_file(str(tfile)), meta


def mlp_sites(lm, layers: tuple[int, ...]) -> list[str]:
    """The MLP in / out projections of `layers` (default: the last three blocks), the sites
    MEND and KnowledgeEditor's GPT port edit."""
    layers = layers or tuple(range(max(0, lm.n_layers - 3), lm.n_layers))
    return [f"blocks.{l}.{p}" for l in layers for p in ("mlp.in", "mlp.out")]


class TrainedEditorMethod:
    """What the methods that apply a trained editor share: loading its artifact for this base
    model (one-line refusals), and the sequential state that checkpoints record - the
    editor's digest, so a stream never resumes with another editor."""

    name = ""

    def load_editor(self, lm, cfg) -> tuple[dict[str, torch.Tensor], dict]:
        if not cfg.editor:
            raise BadInputError(f"{self.name} needs a trained editor: --editor DIR (train one with `kedit train "
                                f"--method {self.name}`)", field="editor")
        if lm.zero3:
            raise BadInputError(f"{self.name} does not run on a ZeRO-3 partitioned model", field="zero3")
        return load_artifact(cfg.editor, method=self.name, fingerprint=lm.fingerprint())

    def state_dict(self, state) -> tuple[dict, dict]:
        return {}, {"editor_digest": state["editor_digest"]}

    def load_state_dict(self, state, tensors: dict, meta: dict):
        if meta.get("editor_digest") not in (None, state["editor_digest"]):
            raise BadInputError(f"the checkpoint was written with editor {meta['editor_digest'][:12]}, "
                                f"not {state['editor_digest'][:12]}", field="editor")
        return state
