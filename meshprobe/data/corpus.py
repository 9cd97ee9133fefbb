"""A corpus: the documents of a spec with a deterministic train / validation split.

Documents (a play, a Bible book, a chunk of a fortune file, a doc page, a user file or jsonl line) are the unit of
the split, so no text leaks between train and validation. The rule is applied to every source separately (each
named source, each path given in the spec), so validation holds a slice of every source:

* a source with at least :data:`MIN_DOCS_FOR_DOC_SPLIT` documents: the documents are ranked by
  ``sha256("<doc id>")`` and the first ``max(1, round(VAL_FRACTION * n))`` go to validation. Document ids are
  machine-independent, so the split is the same on every machine.
* a source with fewer documents (e.g. a single user file): each document is cut by character position; its last
  ``VAL_FRACTION`` (moved forward to the next line start when there is one nearby) goes to validation.
* documents read from a packed file keep the split written in the file.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Iterator, Sequence

from meshprobe.data.files import SPLITS, PathSource, _Doc, _sha
from meshprobe.data.sources import SOURCES, Source
from meshprobe.errors import UserError

VAL_FRACTION = 0.05
"""Share of each source held out for validation (by document, or by the tail of each document for tiny sources)."""
MIN_DOCS_FOR_DOC_SPLIT = 10
"""A source with fewer documents than this is split inside each document (by character position) instead."""
SPLIT_RULE_VERSION = "split-v1"


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _val_ids(ids: Sequence[str]) -> set[str]:
    ranked = sorted(set(ids), key=lambda i: (_sha(i), i))
    k = max(1, round(VAL_FRACTION * len(ranked)))
    return set(ranked[:k])


def _cut_point(text: str) -> int:
    """Where the validation tail of a document starts: last VAL_FRACTION, moved to a line start when close."""
    cut = int(len(text) * (1 - VAL_FRACTION))
    nl = text.find("\n", cut)
    if nl != -1 and nl + 1 < len(text) and nl - cut <= max(200, len(text) * VAL_FRACTION / 2):
        return nl + 1
    return cut


def _resolve_spec(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return ["shakespeare"]
    if isinstance(spec, (str, os.PathLike)):
        spec = [os.fspath(spec)]
    items = [os.fspath(s) for s in spec]
    if not items:
        raise UserError("empty --data: give a source name (shakespeare, mix, ...) or paths")
    return items


class Corpus:
    """Documents of a spec with a deterministic train/validation split (see the module docstring)."""

    def __init__(self, spec: str | Sequence[str] | None = "shakespeare", *, quiet: bool = False):
        self.spec = _resolve_spec(spec)
        self.parts: list[Source | PathSource] = []
        self.skipped: list[str] = []
        for item in self.spec:
            if item == "mix":
                for s in SOURCES.values():
                    if s.available():
                        if s not in self.parts:
                            self.parts.append(s)
                    else:
                        self.skipped.append(s.name)
                        if not quiet:
                            _note(f"meshprobe data: skipping {s.missing_message()}")
                if not any(isinstance(p, Source) for p in self.parts):
                    raise UserError("no corpus source for 'mix' is installed; " + SOURCES["shakespeare"]
                                    .missing_message())
            elif item in SOURCES:
                s = SOURCES[item]
                if not s.available():
                    raise UserError(s.missing_message())
                if s not in self.parts:
                    self.parts.append(s)
            else:
                self.parts.append(PathSource(item))
        self._fingerprint: str | None = None
        self._checked = False

    # -- identity
    @property
    def fingerprint(self) -> str:
        """Stable id of the text and its split: source names + file sizes/mtimes + split rule constants."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{SPLIT_RULE_VERSION}\0{VAL_FRACTION}\0{MIN_DOCS_FOR_DOC_SPLIT}\0".encode())
            for p in self.parts:
                h.update(f"{type(p).__name__}\0{p.name}\0{p.fingerprint()}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def name(self) -> str:
        return "+".join(self.spec)

    def __repr__(self):
        return f"Corpus({self.spec!r}, parts={[p.name for p in self.parts]})"

    # -- documents
    def _part_docs(self, part) -> Iterator[_Doc]:
        if isinstance(part, Source):
            for doc_id, text in part.items():
                yield _Doc(part.name, doc_id, text)
        else:
            yield from part.docs()

    def items(self) -> Iterator[tuple[str, str, str, str]]:
        """All documents as ``(split, source, doc_id, text)`` in a fixed order, each read once."""
        for part in self.parts:
            yield from self._part_items(part)

    def _part_items(self, part) -> Iterator[tuple[str, str, str, str]]:
        ids = part.doc_ids()
        val_ids: set[str] = set()
        doc_split = len(ids) >= MIN_DOCS_FOR_DOC_SPLIT
        if doc_split:
            val_ids = _val_ids(ids)
        n = 0
        for d in self._part_docs(part):
            if not d.text.strip():
                continue
            n += 1
            if d.split is not None:
                yield d.split, d.source, d.doc_id, d.text
            elif doc_split:
                yield ("val" if d.doc_id in val_ids else "train"), d.source, d.doc_id, d.text
            else:
                cut = _cut_point(d.text)
                if cut > 0:
                    yield "train", d.source, d.doc_id, d.text[:cut]
                if cut < len(d.text):
                    yield "val", d.source, d.doc_id + "#tail", d.text[cut:]
        if n == 0:
            where = part.spec_item if isinstance(part, PathSource) else part.name
            raise UserError(f"no text in {where}")

    def check(self) -> None:
        """Read every document once, so that a file that is not text (or holds none) is a one-line UserError
        before anything is trained or written from the corpus. Run before a tokenizer is trained or a token
        cache entry is built (once per Corpus object; a cache hit needs no read)."""
        if not self._checked:
            for _ in self.items():
                pass
            self._checked = True

    def documents(self, split: str) -> Iterator[str]:
        if split not in SPLITS:
            raise UserError(f"split must be 'train' or 'val', not {split!r}")
        for s, _, _, text in self.items():
            if s == split:
                yield text

    def train_documents(self) -> Iterator[str]:
        return self.documents("train")

    def val_documents(self) -> Iterator[str]:
        return self.documents("val")

    def describe(self) -> list[dict]:
        """Per source: documents and UTF-8 bytes in each split."""
        rows: dict[str, dict] = {}
        for part in self.parts:
            for split, source, _, text in self._part_items(part):
                label = source if source == part.name else f"{part.name}:{source}"  # packed files: file:source
                r = rows.setdefault(label, dict(source=label, train_docs=0, val_docs=0, train_bytes=0, val_bytes=0))
                r[f"{split}_docs"] += 1
                r[f"{split}_bytes"] += len(text.encode("utf-8"))
        return list(rows.values())


def open_corpus(spec: str | Sequence[str] | None = "shakespeare", *, quiet: bool = False) -> Corpus:
    """A :class:`Corpus` for a spec (a name, ``mix``, or paths); raises UserError for missing or bad data."""
    return spec if isinstance(spec, Corpus) else Corpus(spec, quiet=quiet)


def load_corpus(spec: str | Sequence[str] | None, split: str) -> Iterator[str]:
    """The documents of one split ('train' or 'val') of a spec."""
    return open_corpus(spec).documents(split)
