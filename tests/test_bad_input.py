"""Every bad input gets one line on stderr, exit 2, no traceback, and nothing is created or changed.

Damaged checkpoints (resume and info), poisoned token caches, absurd sizes, non-text data, output paths
whose parents do not exist, locks held through a symlink, damaged or mismatched transformers model directories,
errors inside trusted remote code, argparse errors; the path, flag and config errors answer before torch loads.
Plus the few things that are not errors (an unknown config.json key warns and goes on, a stale lock file is
taken and removed, file modes).
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_TORCH_SCRIPT, write_tiny_dory, write_tiny_text_run
from meshprobe.cli import main


class Payload:
    """Unpickling this creates the file `marker`: it must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    corpus, preset = write_tiny_text_run(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("MESHPROBE_CACHE", str(root / "cache"))
    good, task = root / "good", root / "task"
    assert main(["train", "--config", str(preset), "--out", str(good), "--quiet"]) == 0
    assert main(["train", "--config", str(preset), "--out", str(task), "--data", "task:phop:hops=1,symbols=4,seq_len=8",
                 "--steps", "1", "--quiet"]) == 0
    yield {"root": root, "preset": preset, "corpus": corpus, "good": good, "task": task, "cache": root / "cache"}
    mp.undo()


def snapshot(root: Path) -> dict:
    def entry(p: Path):
        if p.is_symlink():
            return "link", os.readlink(p)
        return p.is_dir(), None if p.is_dir() else p.read_bytes(), p.stat().st_mode
    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob("*"))}


def one_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"meshprobe {command}: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


# --------------------------------------------------------------------------------------------- damage
def _resave(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _shrink_first(tensors):
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].flatten()[:3].clone()


def _write(name, data):
    return lambda ck: (ck / name).write_bytes(data) if isinstance(data, bytes) else (ck / name).write_text(data)


def _truncate(name):
    return lambda ck: (ck / name).write_bytes((ck / name).read_bytes()[: (ck / name).stat().st_size // 2])


def _edit_json(name, change):
    def apply(ck):
        data = json.loads((ck / name).read_text())
        change(data)
        (ck / name).write_text(json.dumps(data))
    return apply


DAMAGE = {  # name -> (damage(checkpoint folder), a phrase of the message)
    "state json corrupt": (_write("training_state.json", "{not json"), "training_state.json: not valid JSON"),
    "state step not a number": (_edit_json("training_state.json", lambda d: d.update(step="x")), "step must be"),
    "state missing rng": (_edit_json("training_state.json", lambda d: d.pop("rng")), "must be JSON objects"),
    "optimizer garbage": (_write("optimizer.safetensors", os.urandom(4000)), "optimizer.safetensors"),
    "optimizer pickle": (lambda ck: (ck / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(ck / "PWNED"))),
                         "optimizer.safetensors"),
    "optimizer wrong shape": (lambda ck: _resave(ck / "optimizer.safetensors", _shrink_first), "does not match"),
    "rng garbage": (_write("rng.safetensors", b"\x10" + os.urandom(100)), "rng.safetensors"),
    "rng wrong tensor": (lambda ck: _resave(ck / "rng.safetensors", _shrink_first), "rng.safetensors"),
    "weights truncated": (_truncate("model.safetensors"), "truncated or corrupt"),
    "weights wrong shape": (lambda ck: _resave(ck / "model.safetensors", _shrink_first), "has shape"),
    "config corrupt": (_write("config.json", "{"), "config.json: not valid JSON"),
    "config d_model 1e9": (_edit_json("config.json", lambda d: d["model"].update(d_model=10 ** 9)), "d_model"),
    "config layout 1e9 loops": (_edit_json("config.json", lambda d: d["model"].update(layout="1+2R1000000000+1")),
                                "at most 1024"),
    "config n_ctx 1e9": (_edit_json("config.json", lambda d: d["model"].update(n_ctx=10 ** 9)), "n_ctx"),
    "tokenizer malformed": (_write("tokenizer.json", '{"version": "1.0", "model": 3}'), "tokenizer"),
    "config nested 100000 deep": (_write("config.json", "[" * 100_000 + "]" * 100_000), "nested too deeply"),
    "log not utf-8": (_write("train_log.jsonl", b'{"type": "train", "step": 1}\n\xff\xfe\n'), "not UTF-8"),
    "log record of wrong types": (_write("train_log.jsonl", '{"type": "train", "step": "three"}\n'), "step"),
    "log a folder": (lambda ck: ((ck / "train_log.jsonl").unlink(), (ck / "train_log.jsonl").mkdir()), "folder"),
    "optimizer tensor missing": (lambda ck: _resave(ck / "optimizer.safetensors",
                                                     lambda t: t.pop("state.0.exp_avg_sq")), "exp_avg_sq"),
}


def damaged_copy(env, case, tmp_path):
    """A copy of the good checkpoint damaged as DAMAGE[case] says: (its path, the expected phrase, a snapshot of
    tmp_path taken after the damage)."""
    damage, phrase = DAMAGE[case]
    ck = tmp_path / "ck"
    shutil.copytree(env["good"], ck)
    damage(ck)
    return ck, phrase, snapshot(tmp_path)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_of_a_damaged_checkpoint(env, case, tmp_path, capsys):
    ck, phrase, before = damaged_copy(env, case, tmp_path)
    assert main(["train", "--config", str(env["preset"]), "--out", str(ck), "--resume", "--steps", "3", "--quiet"]) == 2
    assert phrase in one_error(capsys, "train")
    assert snapshot(tmp_path) == before and not (ck / "PWNED").exists()


INFO_CASES = ["weights truncated", "weights wrong shape", "config corrupt", "config d_model 1e9",
              "config layout 1e9 loops", "config n_ctx 1e9", "tokenizer malformed", "config nested 100000 deep"]


@pytest.mark.parametrize("case", INFO_CASES)
def test_info_of_a_damaged_checkpoint(env, case, tmp_path, capsys):
    ck, phrase, before = damaged_copy(env, case, tmp_path)
    assert main(["info", str(ck)]) == 2
    assert phrase in one_error(capsys, "info")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------- poisoned cache
def _poison_pickle(arr_path: Path, marker: Path):
    np.save(arr_path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


def _poison_ids(arr_path: Path, marker: Path):
    arr = np.load(arr_path)
    arr[len(arr) // 2] = 60000  # a token id far above the tokenizer's 300
    np.save(arr_path, arr)


def _poison_garbage(arr_path: Path, marker: Path):
    arr_path.write_bytes(os.urandom(500))


@pytest.mark.parametrize("poison", [_poison_pickle, _poison_ids, _poison_garbage], ids=["pickle", "ids", "garbage"])
def test_poisoned_token_cache(env, poison, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(env["cache"], cache)
    entries = [p.parent for p in cache.glob("*/meta.json")]
    assert entries
    for entry in entries:
        poison(entry / "train.npy", tmp_path / "PWNED")
    monkeypatch.setenv("MESHPROBE_CACHE", str(cache))
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--config", str(env["preset"]), "--out", str(out), "--quiet"]) == 2
    assert "token cache" in one_error(capsys, "train")
    assert snapshot(tmp_path) == before and not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------------------------- train input
def _files(tmp: Path) -> dict:
    files = {"random.txt": os.urandom(3000), "latin1.txt": "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 200,
             "utf16.txt": ("hello world\n" * 300).encode("utf-16-le"), "random.jsonl": os.urandom(3000)}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return files


TRAIN_CASES = {  # name -> (extra arguments, --out relative to tmp_path, a phrase of the message)
    "d_model 1e9": (["--d-model", "1000000000"], "out", "d_model = 1000000000 is above"),
    "layout 1e9 loops": (["--layout", "1+2R1000000000+1"], "out", "at most 1024"),
    "n_ctx 1e9": (["--n-ctx", "1000000000"], "out", "n_ctx = 1000000000 is above"),
    "too big for memory": (["--d-model", "65536", "--n-heads", "64"], "out", "GiB"),
    "random bytes .txt": (["--data", "{tmp}/random.txt"], "out", "not UTF-8 text"),
    "latin-1 .txt": (["--data", "{tmp}/latin1.txt"], "out", "not UTF-8 text"),
    "utf-16 .txt": (["--data", "{tmp}/utf16.txt"], "out", "NUL bytes"),
    "random bytes .jsonl": (["--data", "{tmp}/random.jsonl"], "out", "random.jsonl"),
    "missing data, deep out": (["--data", "/no/such/x.txt"], "a/b/out", "data path not found"),
    "bad data, deep out": (["--data", "{tmp}/random.txt"], "a/b/out", "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(env, case, tmp_path, capsys):
    args, out, phrase = TRAIN_CASES[case]
    _files(tmp_path)
    before = snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["train", "--config", str(env["preset"]), "--out", str(tmp_path / out), "--quiet", *args]) == 2
    assert phrase in one_error(capsys, "train")
    assert snapshot(tmp_path) == before  # nothing created (not even the parents of --out) or changed


# --------------------------------------------------------------------------------------------- locks
def _hold(lock_path: Path):
    import fcntl

    f = open(lock_path, "a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_lock_follows_the_real_folder(env, tmp_path, capsys):
    real = tmp_path / "real"
    shutil.copytree(env["good"], real)
    (tmp_path / "link").symlink_to(real)
    held = _hold(tmp_path / ".real.lock")  # a live run on the real folder
    try:
        before = snapshot(tmp_path)
        assert main(["train", "--config", str(env["preset"]), "--out", str(tmp_path / "link"), "--resume",
                     "--steps", "3", "--quiet"]) == 2
        assert "another meshprobe train process" in one_error(capsys, "train")
        assert main(["analyze", str(env["good"]), "--out", str(tmp_path / "link"), "--samples", "2",
                     "--seq-len", "8"]) == 2
        assert "another meshprobe analyze process" in one_error(capsys, "analyze")
        assert snapshot(tmp_path) == before
    finally:
        held.close()
    # with the lock free, resuming through the symlink continues the real folder and keeps the link
    assert main(["train", "--config", str(env["preset"]), "--out", str(tmp_path / "link"), "--resume",
                 "--steps", "3", "--quiet"]) == 0
    assert (tmp_path / "link").is_symlink() and json.loads((real / "config.json").read_text())["metadata"]["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_analyze_bad_input_creates_nothing(env, tmp_path, capsys):
    before = snapshot(tmp_path)
    assert main(["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "a" / "b" / "out")]) == 2
    assert "not found" in one_error(capsys, "analyze")
    assert main(["analyze", str(env["good"]), "--out", str(tmp_path / "a" / "out"), "--tokens",
                 str(tmp_path / "missing.npy")]) == 2
    one_error(capsys, "analyze")
    assert snapshot(tmp_path) == before


def test_stale_lock_is_taken_and_removed(env, tmp_path):
    (tmp_path / ".out.lock").write_text("")  # what a SIGKILLed run leaves
    assert main(["train", "--config", str(env["preset"]), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--eval-batches", "0", "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------------------------- not errors
def test_checkpoint_files_share_one_mode(env):
    modes = {p.name: p.stat().st_mode & 0o777 for p in env["good"].iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors is no longer 0600
    assert modes["model.safetensors"] == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unknown_top_level_config_key_warns_once_and_goes_on(env, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(env["good"], ck)
    _edit_json("config.json", lambda d: d.update(future_feature={"x": 1}))(ck)
    assert main(["info", str(ck), "--json"]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "future_feature" in err[0]
    assert json.loads(captured.out)["config"]["d_model"] == 16


# --------------------------------------------------------------------------------------------- train data
DATA_FILES = {  # name -> (file name, bytes, a phrase of the message)
    "empty .txt": ("empty.txt", b"", "no text"),
    "binary .txt": ("binary.txt", bytes(range(256)) * 20, "not UTF-8 text"),
    "latin-1 .txt": ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 200, "not UTF-8 text"),
    "broken .jsonl": ("broken.jsonl", b'{"text": "hello"}\n{"text": "wor\n', "not valid JSON"),
    "text-less .jsonl": ("textless.jsonl", b'{"body": "hello"}\n', "'text' field"),
    "empty-text .jsonl": ("emptytext.jsonl", b'{"text": ""}\n{"text": "  "}\n', "no text"),
    "fake .parquet": ("fake.parquet", b"PAR1 this is not parquet PAR1", "fake.parquet"),
    "fake .txt.gz": ("fake.txt.gz", b"plain text, not gzip\n" * 50, "fake.txt.gz"),
    "truncated .txt.gz": ("trunc.txt.gz", None, "trunc.txt.gz"),
    "fake .txt.xz": ("fake.txt.xz", b"plain text, not xz\n" * 50, "fake.txt.xz"),
}


def _truncated_gz() -> bytes:
    import gzip

    whole = gzip.compress(("some text for a corpus\n" * 2000).encode())
    return whole[: len(whole) // 2]


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_bad_data_is_read_before_the_tokenizer(env, case, tmp_path, capsys, monkeypatch):
    """Not quiet: nothing is announced (no "tokenizer for ..." line), and the fresh cache stays absent (no
    tokenizer lock): the data is read and checked before a tokenizer is trained."""
    name, raw, phrase = DATA_FILES[case]
    (tmp_path / name).write_bytes(_truncated_gz() if raw is None else raw)
    monkeypatch.setenv("MESHPROBE_CACHE", str(tmp_path / "cache"))
    before = snapshot(tmp_path)
    assert main(["train", "--config", str(env["preset"]), "--out", str(tmp_path / "out"),
                 "--data", str(tmp_path / name)]) == 2
    assert phrase in one_error(capsys, "train")
    assert snapshot(tmp_path) == before


def test_new_run_on_a_damaged_token_cache_announces_nothing(env, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(env["cache"], cache)
    for entry in [p.parent for p in cache.glob("*/meta.json")]:
        _poison_garbage(entry / "train.npy", tmp_path / "PWNED")
    monkeypatch.setenv("MESHPROBE_CACHE", str(cache))
    before = snapshot(tmp_path)
    assert main(["train", "--config", str(env["preset"]), "--out", str(tmp_path / "out")]) == 2
    assert "token cache" in one_error(capsys, "train")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------- every command
def _file(tmp: Path, name: str, text: str = "x") -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def _zoo_spec(tmp: Path, body: str) -> str:
    return str(_file(tmp, "zoo.toml", body))


_ZOO_OK = 'preset = "tiny"\n[[run]]\nname = "a"\nseeds = [0]\n'

# name -> (argv(env, tmp) -> arguments after `meshprobe`, a phrase of the message). Each must exit 2 with one
# line, create nothing under tmp and change nothing there (the cache is a fresh folder under tmp).
COMMAND_CASES = {
    # output paths that cannot be made
    "train out under a file": (lambda e, t: ["train", "--config", str(e["preset"]), "--out",
                                             str(_file(t, "f") / "out")], "is a file"),
    "analyze out under a file": (lambda e, t: ["analyze", str(e["good"]), "--out", str(_file(t, "f") / "out")],
                                 "is a file"),
    "pack out under a file": (lambda e, t: ["data", "pack", "--data", str(e["corpus"]), "--out",
                                            str(_file(t, "f") / "out.txt")], "is a file"),
    "train out under /proc": (lambda e, t: ["train", "--config", str(e["preset"]), "--out", "/proc/meshprobe/out"],
                              "/proc"),
    "analyze out under /proc": (lambda e, t: ["analyze", str(e["good"]), "--out", "/proc/meshprobe/out"], "/proc"),
    "pack out under /proc": (lambda e, t: ["data", "pack", "--data", str(e["corpus"]), "--out",
                                           "/proc/meshprobe/out.txt"], "/proc"),
    "train out under /sys": (lambda e, t: ["train", "--config", str(e["preset"]), "--out", "/sys/meshprobe/out"],
                             "/sys"),
    "analyze out under /sys": (lambda e, t: ["analyze", str(e["good"]), "--out", "/sys/meshprobe/out"], "/sys"),
    "pack out under /sys": (lambda e, t: ["data", "pack", "--data", str(e["corpus"]), "--out",
                                          "/sys/meshprobe/out.txt"], "/sys"),
    "pack out an existing folder": (lambda e, t: ["data", "pack", "--data", str(e["corpus"]), "--out",
                                                  str(_mkdir(t / "dir.txt"))], "is a folder"),
    "train out a symlink loop": (lambda e, t: ["train", "--config", str(e["preset"]), "--out", str(_loop(t))],
                                 "symlink loop"),
    "analyze out = the checkpoint": (lambda e, t: ["analyze", str(_copy(e["good"], t / "ck")), "--out",
                                                   str(t / "ck")], "checkpoint"),
    "analyze out inside the checkpoint": (lambda e, t: ["analyze", str(_copy(e["good"], t / "ck")), "--out",
                                                        str(t / "ck" / "figs")], "checkpoint"),
    # sizes that cannot fit
    "analyze samples 1e12": (lambda e, t: ["analyze", str(e["good"]), "--out", str(t / "o"), "--samples",
                                           "1000000000000"], "GiB"),
    "train batch size 1e8": (lambda e, t: ["train", "--config", str(e["preset"]), "--out", str(t / "o"),
                                           "--batch-size", "100000000"], "GiB"),
    "data show task symbols 1e12": (lambda e, t: ["data", "show", "--data", "task:phop:symbols=1000000000000"],
                                    "symbols"),
    # values with no meaning
    "train seq-len 0": (lambda e, t: ["train", "--config", str(e["preset"]), "--out", str(t / "o"), "--seq-len", "0"],
                        "seq_len"),
    "eval seq-len 0": (lambda e, t: ["eval", str(e["good"]), "--seq-len", "0"], "--seq-len"),
    "eval batch-size 0": (lambda e, t: ["eval", str(e["good"]), "--batch-size", "0"], "--batch-size"),
    "analyze offset 100000": (lambda e, t: ["analyze", str(e["good"]), "--out", str(t / "o"), "--samples", "2",
                                            "--seq-len", "8", "--offsets", "0,100000"], "100000"),
    # every checkpoint checked before the first is analyzed
    "analyze A B, B a task checkpoint": (lambda e, t: ["analyze", str(e["good"]), str(e["task"]), "--out",
                                                       str(t / "o"), "--samples", "2", "--seq-len", "8"], "task"),
    # damaged bundles
    "figures zoo.json not JSON": (lambda e, t: ["figures", "--checkpoints", str(_bundle(t, "{not json")), "--out",
                                                str(t / "figs")], "zoo.json"),
    # zoo specs: --list checks them, and an error leaves no output folder
    "zoo list unknown preset": (lambda e, t: ["zoo", "--list", "--spec", _zoo_spec(t, _ZOO_OK.replace("tiny", "nope"))],
                                "nope"),
    "zoo list negative seed": (lambda e, t: ["zoo", "--list", "--spec", _zoo_spec(t, _ZOO_OK.replace("[0]", "[-1]"))],
                               "seed"),
    "zoo list d_model -5": (lambda e, t: ["zoo", "--list", "--spec", _zoo_spec(t, _ZOO_OK + "d_model = -5\n")],
                            "d_model"),
    "zoo list empty spec": (lambda e, t: ["zoo", "--list", "--spec", _zoo_spec(t, "")], "no [[run]]"),
    "zoo only no-such-run": (lambda e, t: ["zoo", "--spec", _zoo_spec(t, _ZOO_OK), "--only", "no-such-run", "--out",
                                           str(t / "runs")], "no-such-run"),
    "zoo unknown preset": (lambda e, t: ["zoo", "--spec", _zoo_spec(t, _ZOO_OK.replace("tiny", "nope")), "--out",
                                         str(t / "runs")], "nope"),
    "zoo d_model -5": (lambda e, t: ["zoo", "--spec", _zoo_spec(t, _ZOO_OK + "d_model = -5\n"), "--out",
                                     str(t / "runs")], "d_model"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _loop(tmp: Path) -> Path:
    (tmp / "loop").symlink_to(tmp / "loop")
    return tmp / "loop"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _bundle(tmp: Path, manifest: str) -> Path:
    (tmp / "bundle").mkdir()
    _file(tmp / "bundle", "zoo.json", manifest)
    return tmp / "bundle"


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_command_bad_input(env, case, tmp_path, capsys, monkeypatch):
    argv, phrase = COMMAND_CASES[case]
    monkeypatch.setenv("MESHPROBE_CACHE", str(tmp_path / "cache"))
    args = argv(env, tmp_path)
    before = snapshot(tmp_path)
    assert main(args) == 2
    assert phrase in one_error(capsys, args[0])
    assert snapshot(tmp_path) == before


def test_zero_values_with_a_meaning_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--save-every 0" in text and "--eval-every 0" in text


# --------------------------------------------------------------------------------------------- transformers dirs
@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfbad")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 128, (4, 16)))
    return {"dory": write_tiny_dory(root / "dory"), "tokens": root / "tokens.npy"}


def _header_lies(ck):
    """model.safetensors whose header gives its first tensor another shape (its bytes unchanged)."""
    raw = (ck / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    first = sorted(k for k in header if k != "__metadata__")[0]
    header[first]["shape"] = [header[first]["shape"][0] + 1, *header[first]["shape"][1:]]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # safetensors writes it compact
    assert len(text) == n
    (ck / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + n:])


def _sharded(ck, change):
    """model.safetensors renamed as shard 1 of 2, with an index that `change` damages."""
    from safetensors import safe_open

    shard = "model-00001-of-00002.safetensors"
    (ck / "model.safetensors").rename(ck / shard)
    with safe_open(str(ck / shard), "pt") as f:
        weight_map = {k: shard for k in f.keys()}
    change(weight_map)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _second_shard_missing(weight_map):
    for k in sorted(weight_map)[::2]:
        weight_map[k] = "model-00002-of-00002.safetensors"


def _config(**change):
    return _edit_json("config.json", lambda d: d.update(change))


HF_DAMAGE = {  # name -> (damage(model directory), a phrase of the message); every case for info and analyze
    "weights truncated": (_truncate("model.safetensors"), "model.safetensors: truncated or corrupt"),
    "weights random bytes": (_write("model.safetensors", os.urandom(5000)), "model.safetensors: truncated or corrupt"),
    "weights trailing bytes": (lambda ck: (ck / "model.safetensors").open("ab").write(b"\0" * 10), "trailing bytes"),
    "weights header lies about a shape": (_header_lies, "bytes for shape"),
    "weights empty": (_write("model.safetensors", b""), "shorter than a safetensors header"),
    "weights only pickles": (lambda ck: ((ck / "model.safetensors").rename(ck / "pytorch_model.bin")),
                             "pickle files are never loaded"),
    "index shard missing": (lambda ck: _sharded(ck, _second_shard_missing), "model-00002-of-00002.safetensors is missing"),
    "index tensor not in its shard": (lambda ck: _sharded(ck, lambda m: m.update({"lm_head.extra": m[sorted(m)[0]]})),
                                      "'lm_head.extra' is not in its shard"),
    "index shard outside the folder": (lambda ck: _sharded(ck, lambda m: m.update(x="../model.safetensors")),
                                       "not a .safetensors file in the directory"),
    "index not JSON": (lambda ck: (_sharded(ck, lambda m: None), _write("model.safetensors.index.json", "{")(ck)),
                       "model.safetensors.index.json: not valid JSON"),
    "hidden_size 32 (weights 64)": (_config(hidden_size=32), "but config.json has hidden_size = 32"),
    "hidden_size 2**20": (_config(hidden_size=2 ** 20), "hidden_size = 1048576"),
    "intermediate_size 256 (weights 128)": (_config(intermediate_size=256), "do not match config.json"),
    "vocab_size 2**30": (_config(vocab_size=2 ** 30), "vocab_size = 1073741824"),
    "intermediate_size 2**30 (a model of TBs)": (_config(intermediate_size=2 ** 30), "GiB"),
    "n_recurrent_loops 0": (_config(n_recurrent_loops=0), "n_recurrent_loops must be a loop count from 1 to 1024"),
    "n_recurrent_loops -3": (_config(n_recurrent_loops=-3), "n_recurrent_loops must be a loop count"),
    "n_recurrent_loops 1e6": (_config(n_recurrent_loops=10 ** 6), "got 1000000"),
    "n_recurrent_loops a string": (_config(n_recurrent_loops="3"), "got '3'"),
    "config.json not an object": (_write("config.json", "[1, 2]"), "config.json"),
    "config.json not JSON": (_write("config.json", "{"), "config.json"),
    "num_attention_heads 3 (weights for 4)": (_config(num_attention_heads=3), "do not match config.json"),
    "hidden_size a string": (_config(hidden_size="x"), "hidden_size must be a positive integer, got 'x'"),
    "head_dim a string (the config class refuses it)": (_config(head_dim="x"), "config.json: transformers refuses it"),
}


@pytest.mark.parametrize("command", ["info", "analyze"])
@pytest.mark.parametrize("case", list(HF_DAMAGE))
def test_damaged_transformers_directory(hf_env, case, command, tmp_path, capsys):
    damage, phrase = HF_DAMAGE[case]
    ck = tmp_path / "dory"
    shutil.copytree(hf_env["dory"], ck)
    damage(ck)
    before = snapshot(tmp_path)
    extra = ["--out", str(tmp_path / "out"), "--tokens", str(hf_env["tokens"])] if command == "analyze" else []
    assert main([command, str(ck), *extra]) == 2
    assert phrase in one_error(capsys, command)
    assert snapshot(tmp_path) == before


HF_COMMANDS = {  # name -> (arguments after the model directory, a phrase of the message)
    "analyze --loops 1000000": (["analyze", "--loops", "1000000", "--tokens", "{tokens}"], "--loops 1000000: give 1 to 1024"),
    "info --loops 1000000": (["info", "--loops", "1000000"], "--loops 1000000: give 1 to 1024"),
    "analyze, states of a batch too big": (["analyze", "--loops", "1024", "--batch-size", "1000000", "--samples",
                                            "1000000", "--seq-len", "128"], "GiB"),
    "analyze --data without a tokenizer": (["analyze", "--data", "shakespeare"], "--tokens FILE.npy"),
    "analyze, no data flag, no tokenizer": (["analyze"], "--tokens FILE.npy"),
    "analyze DIR MISSING": (["analyze", "{missing}"], "checkpoint not found"),
    "analyze DIR DAMAGED-DIR": (["analyze", "{damaged}", "--tokens", "{tokens}"], "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(HF_COMMANDS))
def test_transformers_directory_bad_flags(hf_env, case, tmp_path, capsys):
    args, phrase = HF_COMMANDS[case]
    damaged = tmp_path / "damaged"
    shutil.copytree(hf_env["dory"], damaged)
    _truncate("model.safetensors")(damaged)
    args = [a.replace("{tokens}", str(hf_env["tokens"])).replace("{missing}", str(tmp_path / "nope"))
            .replace("{damaged}", str(damaged)) for a in args]
    out = ["--out", str(tmp_path / "out")] if args[0] == "analyze" else []
    before = snapshot(tmp_path)
    assert main([args[0], str(hf_env["dory"]), *args[1:], *out]) == 2
    assert phrase in one_error(capsys, args[0])
    assert snapshot(tmp_path) == before


def test_a_good_directory_still_loads(hf_env, capsys):
    """The checks refuse nothing sound: the same directory the damage cases start from."""
    assert main(["info", str(hf_env["dory"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["n_loops"] == 3


def test_wrap_bounds_loop_counts_too(hf_env):
    """A model already in memory gets the same bound, from loops or from its config."""
    from meshprobe import hf
    from meshprobe.errors import UserError

    model = hf.load(hf_env["dory"]).hf
    with pytest.raises(UserError, match="give 1 to 1024 loop steps"):
        hf.wrap(model, loops=10 ** 6)
    model.config.n_recurrent_loops = 5000
    with pytest.raises(UserError, match="n_recurrent_loops = 5000: at most 1024"):
        hf.wrap(model)


def test_model_type_known_from_transformers_source():
    from meshprobe.hf.checks import known_model_type

    assert known_model_type("dory") is None and known_model_type("ouro") is False
    assert known_model_type("not_a_model_type") is False


# --------------------------------------------------------------------------------------------- argparse
ARGPARSE_CASES = {  # argv -> a phrase of the one line
    "analyze --samples abc": (["analyze", "x", "--samples", "abc"], "argument --samples: invalid int value: 'abc'"),
    "train without --out": (["train", "--config", "tiny"], "the following arguments are required: --out"),
    "train --seed 1.5 (an override)": (["train", "--config", "tiny", "--out", "x", "--seed", "1.5"], "--seed"),
    "eval --batches x": (["eval", "x", "--batches", "x"], "argument --batches"),
    "info, unknown flag": (["info", "x", "--bogus"], "unrecognized arguments: --bogus"),
    "analyze, no checkpoint": (["analyze"], "the following arguments are required: CKPT"),
    "analyze --probe-l2 nope": (["analyze", "x", "--probe-l2", "nope"], "argument --probe-l2: invalid choice"),
}


@pytest.mark.parametrize("case", list(ARGPARSE_CASES))
def test_argparse_errors_are_one_line(case, capsys):
    argv, phrase = ARGPARSE_CASES[case]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits; a library UserError returns
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"meshprobe {argv[0]}: error: ") and phrase in err[0], err


def test_help_keeps_its_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: meshprobe analyze") and "--samples" in out


# --------------------------------------------------------------------------------------------- remote code
def _run_cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "meshprobe", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_an_error_inside_trusted_remote_code_is_one_line(tmp_path):
    """--trust-remote-code on a directory whose modeling file raises on import, and on one whose forward raises:
    one line naming the file and the error, exit 2, nothing written."""
    from hf_standins import write_remote_ouro

    work = tmp_path / "work"
    on_import, on_forward = work / "raises-on-import", work / "raises-in-forward"
    for d in (on_import, on_forward):
        write_remote_ouro(d, work / "IMPORTED")
    f, raising = on_import / "modeling_ouro.py", "raise RuntimeError('no kernels for this build')"
    f.write_text(f.read_text().replace("import torch\n", f"import torch\n{raising}\n", 1))
    line = f.read_text().splitlines().index(raising) + 1
    f = on_forward / "modeling_ouro.py"
    f.write_text(f.read_text().replace("        h, _, _ = self.model(input_ids)\n",
                                       "        h, _, _ = self.model(input_ids)\n        h = h @ torch.eye(3)\n"))
    np.save(work / "tokens.npy", np.random.default_rng(0).integers(0, 50, (4, 12)))
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "hf-home")}
    (work / "IMPORTED").unlink(missing_ok=True)
    before = snapshot(work)
    for d, phrase in ((on_import, f"modeling_ouro.py (line {line}) raised RuntimeError: no kernels for this build"),
                      (on_forward, "modeling_ouro.py")):
        done = _run_cli(["analyze", str(d), "--out", str(work / "out"), "--tokens", str(work / "tokens.npy"),
                         "--no-probes", "--no-progress", "--trust-remote-code"], env)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and phrase in err[0] and str(d) in err[0], done.stderr[-3000:]
    done = _run_cli(["info", str(on_import), "--trust-remote-code"], env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "modeling_ouro.py" in done.stderr
    (work / "IMPORTED").unlink(missing_ok=True)  # the trusted code ran (the point of the flag)
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------------- before torch


def test_bad_input_answers_before_torch_loads(env, hf_env, tmp_path):
    """One fresh interpreter runs bad inputs of every kind and still has not imported torch or transformers:
    the path, flag, config, loop-count, size and weight-header checks come first."""
    bad = {}
    for case in ("weights truncated", "hidden_size 32 (weights 64)", "n_recurrent_loops 0", "index shard missing"):
        bad[case] = tmp_path / case.split()[0] / case.replace(" ", "_")
        shutil.copytree(hf_env["dory"], bad[case])
        HF_DAMAGE[case][0](bad[case])
    remote = tmp_path / "remote"
    shutil.copytree(hf_env["dory"], remote)
    _config(auto_map={"AutoModelForCausalLM": "modeling_x.X"})(remote)
    unknown = tmp_path / "unknown-type"
    shutil.copytree(hf_env["dory"], unknown)
    _config(model_type="not_a_model_type")(unknown)
    out, good, dory, tokens = str(tmp_path / "out"), str(env["good"]), str(hf_env["dory"]), str(hf_env["tokens"])
    cases = [["info", str(tmp_path / "nope")], ["eval", str(tmp_path / "nope")], ["analyze", str(tmp_path / "nope")],
             ["analyze", good, "--out", out, "--samples", "1"], ["analyze", good, "--out", out, "--loops", "5000"],
             ["analyze", good, "--out", out, "--tokens", str(tmp_path / "missing.npy")],
             ["eval", good, "--loops", "5000"], ["analyze", good, "--samples", "abc"],
             ["train", "--config", str(env["preset"]), "--out", out, "--d-model", "1000000000"],
             ["train", "--config", str(env["preset"]), "--out", out, "--batch-size", "100000000"],
             ["figures", "--checkpoints", str(tmp_path / "nope"), "--out", out],
             ["analyze", dory, "--out", out, "--loops", "1000000", "--tokens", tokens],
             ["analyze", dory, "--out", out, "--data", "shakespeare"], ["info", str(remote)], ["info", str(unknown)],
             ["analyze", dory, "--out", out, "--loops", "1024", "--batch-size", "10000", "--samples", "10000"]]
    cases += [["info", str(d)] for d in bad.values()] + [["analyze", str(d), "--out", out] for d in bad.values()]
    done = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT.format(cases=cases)], capture_output=True, text=True,
                          check=False, env={**os.environ, "MESHPROBE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
    assert len(done.stderr.strip().splitlines()) == len(cases)  # one line each
    assert not (tmp_path / "out").exists()
