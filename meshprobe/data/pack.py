"""``meshprobe data pack``: a corpus and its split in one compressed text file that ``--data FILE`` reads anywhere."""
from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path
from typing import Sequence

from meshprobe._io import atomic_path
from meshprobe.checks import check_out_path
from meshprobe.data.corpus import Corpus, open_corpus
from meshprobe.data.files import _PACK_PREFIX, PACK_DOC, PACK_ESC, PACK_MAGIC
from meshprobe.errors import UserError


def pack(spec: str | Sequence[str] | Corpus, out_path: str | os.PathLike) -> dict:
    """Write a corpus (with its split) into one compressed text file that ``--data FILE`` accepts anywhere.

    Format (UTF-8; ``.txt.xz`` -> xz, ``.txt.gz`` -> gzip, ``.txt`` -> plain):

    * line 1: ``@@meshprobe-pack v1`` followed by the spec and the corpus fingerprint (comments);
    * each document: a marker line ``@@meshprobe-doc<TAB>{train|val}<TAB>{source}<TAB>{doc id}``, then the
      document text, then one ``\\n`` (dropped again on reading, so texts round-trip exactly). Text lines that
      start with ``@@meshprobe`` are escaped with a ``@@meshprobe-esc:`` prefix.

    The split is written explicitly, so loading the file reproduces the same train/val documents on any machine
    whatever the split rule there. Written atomically (temp file in the same folder + os.replace); an output
    path that cannot be made is refused before the corpus is read.
    Returns ``dict(path, n_bytes, train_docs, val_docs, text_bytes)``.
    """
    out = Path(out_path)
    check_out_path(out, kind="file", name="out_path")
    if out.name.endswith(".xz"):
        opener = lambda p: lzma.open(p, "wt", encoding="utf-8", newline="\n", preset=6)  # noqa: E731
    elif out.name.endswith(".gz"):
        opener = lambda p: gzip.open(p, "wt", encoding="utf-8", newline="\n", compresslevel=6)  # noqa: E731
    elif out.name.endswith(".txt"):
        opener = lambda p: open(p, "w", encoding="utf-8", newline="\n")  # noqa: E731
    else:
        raise UserError(f"pack output must end in .txt.xz, .txt.gz or .txt: {out}")
    corpus = open_corpus(spec)
    counts = dict(train_docs=0, val_docs=0, text_bytes=0)
    with atomic_path(out) as tmp:
        with opener(tmp) as f:
            f.write(f"{PACK_MAGIC} v1\tspec={' '.join(corpus.spec)}\tfingerprint={corpus.fingerprint}\n")
            for split, source, doc_id, text in corpus.items():
                source = source.replace("\t", " ").replace("\n", " ")
                doc_id = doc_id.replace("\t", " ").replace("\n", " ")
                f.write(f"{PACK_DOC}\t{split}\t{source}\t{doc_id}\n")
                if _PACK_PREFIX in text:
                    text = "\n".join(PACK_ESC + ln if ln.startswith(_PACK_PREFIX) else ln for ln in text.split("\n"))
                f.write(text)
                f.write("\n")
                counts[f"{split}_docs"] += 1
                counts["text_bytes"] += len(text.encode("utf-8"))
    return dict(path=str(out), n_bytes=out.stat().st_size, **counts)
