"""Text corpora for second-moment statistics and perplexity: text files (one paragraph per
non-empty line; WikiText headings skipped), JSONL / JSON / parquet files with a text column,
or a `datasets` dataset ("hf:NAME[:CONFIG]:SPLIT"). Each corpus has an id and a content
hash, recorded with every statistic computed from it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kedit_core.errors import BadInputError

log = logging.getLogger(__name__)

# WikiText-2 test beside the project; KEDIT_DEFAULT_CORPUS names another file (a machine's
# own default; a stream records which corpus it resolved to and refuses to resume on another).
DEFAULT_CORPUS = Path(os.environ.get("KEDIT_DEFAULT_CORPUS") or
                      Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext" / "wiki.test.raw")


def _pydoc_texts() -> Iterator[str]:
    """Paragraphs of the docstrings of Python's standard library: real English text that
    every machine has, the fallback corpus where WikiText is absent."""
    import importlib
    import inspect
    import pkgutil
    import sys
    import warnings

    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip",
            "venv", "pydoc_data", "__")
    names = sorted(set(sys.stdlib_module_names))
    seen = set()
    for name in names:
        if name.startswith(skip):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if len(text) > 80 and text not in seen and not text.startswith((">>>", "..")):
                    seen.add(text)
                    yield text


@dataclass(frozen=True)
class Corpus:
    id: str                   # what the user gave
    files: tuple[Path, ...]
    text_column: str = "text"
    hf: tuple[str, str | None, str] | None = None

    def content_hash(self) -> str:
        h = hashlib.sha256()
        if self.id == "builtin:pydoc":
            for t in self.texts():
                h.update(t.encode())
            return h.hexdigest()
        if self.hf:
            h.update(json.dumps(self.hf).encode())
            return h.hexdigest()
        for f in self.files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        h.update(self.text_column.encode())
        return h.hexdigest()

    def texts(self) -> "CorpusTexts":
        """The corpus's texts in order (an iterable that knows its source, so that a consumer
        finding no usable text can name the corpus)."""
        return CorpusTexts(self)

    def _iter_texts(self) -> Iterator[str]:
        if self.id == "builtin:pydoc":
            yield from _pydoc_texts()
            return
        if self.hf:
            import datasets

            name, config, split = self.hf
            ds = datasets.load_dataset(name, config, split=split)
            for row in ds:
                t = row.get(self.text_column)
                if isinstance(t, str) and t.strip():
                    yield t.strip()
            return
        for f in self.files:
            yield from _file_texts(f, self.text_column)


class CorpusTexts:
    """Iterable over a corpus's texts; `source` names the corpus in error messages."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.source = corpus.id

    def __iter__(self) -> Iterator[str]:
        return self.corpus._iter_texts()


def no_usable_text(source: str | None, detail: str = "") -> BadInputError:
    """The error for a corpus that yields nothing to compute statistics on."""
    return BadInputError("the corpus holds no usable text (only blank lines, headings or texts of "
                         f"fewer than 2 tokens{detail})", file=source, field="stats_corpus")


def check_has_text(corpus: Corpus) -> None:
    """Refuse, reading only up to the first text, a corpus with no non-empty text at all.
    (Texts too short to use are found by `moments.tokenize_corpus`, which has the tokenizer.)"""
    for _ in corpus.texts():
        return
    raise no_usable_text(corpus.id)


def _file_texts(f: Path, column: str) -> Iterator[str]:
    if f.suffix in (".jsonl", ".json", ".parquet"):
        from kedit_core.data.readers import read_records

        for i, rec in enumerate(read_records(f)):
            t = rec.get(column) if isinstance(rec, dict) else None
            if not isinstance(t, str):
                raise BadInputError(f"no text column {column!r}", file=str(f), record=i, field=column)
            if t.strip():
                yield t.strip()
        return
    with open(f, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if s and not (s.startswith("=") and s.endswith("=")):
                yield s


def open_corpus(spec: str | Path | None, *, text_column: str = "text") -> Corpus:
    """A corpus from a path (file or directory), a list of paths joined by ",", or
    "hf:NAME[:CONFIG]:SPLIT", or "builtin:pydoc" (the standard library's docstrings). None
    means WikiText-2 test from ../shared/data when present, else "builtin:pydoc"."""
    if spec is None:
        if DEFAULT_CORPUS.is_file():
            return Corpus("wikitext-2-test", (DEFAULT_CORPUS,), text_column)
        log.info("WikiText-2 (%s) is absent; using the docstrings of Python's standard library", DEFAULT_CORPUS)
        spec = "builtin:pydoc"
    spec = str(spec)
    if spec == "builtin:pydoc":
        return Corpus(spec, (), text_column)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) not in (2, 3):
            raise BadInputError(f"expected hf:NAME[:CONFIG]:SPLIT, got {spec!r}", field="stats_corpus")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        return Corpus(spec, (), text_column, (name, config, split))
    files: list[Path] = []
    for part in spec.split(","):
        p = Path(part).expanduser()
        if p.is_dir():
            files += sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in
                            (".txt", ".raw", ".jsonl", ".json", ".parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise BadInputError("no such corpus file or directory", file=part, field="stats_corpus")
    if not files:
        raise BadInputError("the corpus holds no text files", file=spec, field="stats_corpus")
    return Corpus(spec, tuple(files), text_column)


def fallback_corpus(corpus: Corpus) -> Corpus | None:
    """A built-in corpus other than `corpus` (for held-out perplexity when the statistics
    consumed all of `corpus`): WikiText-2 test when present and not `corpus` itself, else the
    standard library's docstrings unless `corpus` is that; None when neither qualifies."""
    if corpus.id != "builtin:pydoc" and corpus.files != (DEFAULT_CORPUS,):
        if DEFAULT_CORPUS.is_file():
            return Corpus("wikitext-2-test", (DEFAULT_CORPUS,), corpus.text_column)
        return Corpus("builtin:pydoc", (), corpus.text_column)
    if corpus.id == "builtin:pydoc":
        return Corpus("wikitext-2-test", (DEFAULT_CORPUS,), corpus.text_column) if DEFAULT_CORPUS.is_file() else None
    return Corpus("builtin:pydoc", (), corpus.text_column)

