"""The checkpoint zoo: train a family of matched-compute models from one spec, collect their numbers, bundle.

A zoo spec is a TOML file (bundled specs in meshprobe/configs/zoo/: zoo-cpu, zoo-gpu):

    description = "..."
    preset = "cpu-zoo"            # training preset every run starts from ([model] + [train])
    [overrides]                   # applied to every run (e.g. data = "mix", steps = 400)
    [[run]]                       # one entry per model; expanded over `seeds`
    name = "loop3-base"           # run directory: <out>/<name>-s<seed>
    group = "loop3"               # family / table the run belongs to (free text)
    seeds = [0, 1, 2]
    layout = "1+2R3+1"            # any other key: a model or train override for this run
    variant = "base"
    [bundle]
    runs = ["loop3-vanilla", ...] # seed-0 runs copied (fp16, no optimizer state) into checkpoints/ ("name-sN":
                                  # that seed instead)
    samples = 500                 # validation token sample shipped beside them
    seq_len = 128
    merge = false                 # true: replace same-named models in an existing bundle, keep the rest (and
                                  # its results.json); each model's manifest entry names the spec and run it came from
    [bundle.as]                   # optional bundled name of a run (default: the run's name)
    "phop2-mesh-zeros-s1" = "phop2-mesh"

A zoo whose data is a synthetic task (``data = "task:..."``, :mod:`meshprobe.data.tasks`) has no tokenizer and no
validation token sample: its results carry each run's task accuracy on fresh sequences (:func:`task_row`).

All runs of a zoo share one tokenizer (trained once on the zoo's data), so their validation tokens, losses
and analyses are directly comparable. Training resumes where a run stopped; finished runs are skipped.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from meshprobe import _io
from meshprobe.checkpoint import VAL_TOKENS_FILE
from meshprobe.errors import UserError

RESULTS_FILE = "results.json"
MANIFEST_FILE = "zoo.json"
ZOO_DIR = Path(__file__).resolve().parents[1] / "configs" / "zoo"


@dataclass
class ZooRun:
    name: str
    group: str
    seed: int
    overrides: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.name}-s{self.seed}"


@dataclass
class ZooSpec:
    path: Path
    description: str
    preset: str
    overrides: dict
    runs: list[ZooRun]
    bundle_runs: list[str]
    bundle_samples: int
    bundle_seq_len: int
    bundle_as: dict = field(default_factory=dict)
    bundle_merge: bool = False

    def bundle_run(self, entry: str) -> ZooRun:
        """The run a [bundle] entry names: "name-sN" itself, else seed 0 of "name"."""
        return next(r for r in self.runs if r.run_id in (entry, f"{entry}-s0"))


def resolve_zoo(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = ZOO_DIR / f"{name_or_path}.toml"
    if "/" not in str(name_or_path) and preset.is_file():
        return preset
    names = sorted(p.stem for p in ZOO_DIR.glob("*.toml"))
    raise UserError(f"zoo spec {name_or_path!r} not found; known: {', '.join(names)}")


def load_zoo(name_or_path: str) -> ZooSpec:
    """Read and check a zoo spec (a bundled name or a TOML path): its keys, seeds, and the config of every run."""
    path = resolve_zoo(name_or_path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - {"description", "preset", "overrides", "run", "bundle"})
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}")
    runs = []
    for entry in doc.get("run", []):
        entry = dict(entry)
        if "name" not in entry:
            raise UserError(f"{path}: every [[run]] needs a name")
        name, group, seeds = entry.pop("name"), entry.pop("group", ""), entry.pop("seeds", [0])
        if not isinstance(seeds, list) or not seeds or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise UserError(f"{path}: run {name!r}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
        runs += [ZooRun(name, group, seed, entry) for seed in seeds]
    if not runs:
        raise UserError(f"{path}: no [[run]] entries (a zoo spec names at least one run)")
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: duplicate run names {sorted({i for i in ids if ids.count(i) > 1})}")
    bundle = doc.get("bundle", {})
    missing = [n for n in bundle.get("runs", []) if n not in ids and f"{n}-s0" not in ids]
    if missing:
        raise UserError(f"{path}: [bundle] names runs that are neither a run id nor a run with a seed-0 entry: {missing}")
    unknown = sorted(set(bundle.get("as", {})) - set(bundle.get("runs", [])))
    if unknown or not isinstance(bundle.get("merge", False), bool):
        raise UserError(f"{path}: [bundle.as] names runs not in [bundle] runs: {unknown}" if unknown
                        else f"{path}: [bundle] merge must be true or false")
    spec = ZooSpec(path, doc.get("description", ""), doc.get("preset", "cpu-zoo"), doc.get("overrides", {}), runs,
                   bundle.get("runs", []), int(bundle.get("samples", 500)), int(bundle.get("seq_len", 128)),
                   dict(bundle.get("as", {})), bundle.get("merge", False))
    for run in runs:  # every run's config is valid (preset, keys, values) before anything is listed or trained
        try:
            run_configs(spec, run)
        except UserError as exc:
            raise UserError(f"{path}: run {run.run_id}: {exc}") from None
    return spec


def run_configs(spec: ZooSpec, run: ZooRun, tokenizer: str | None = None):
    """(ModelConfig, TrainConfig) of one run: preset, then zoo overrides, then the run's own keys."""
    from meshprobe.training import load_config

    overrides = {**spec.overrides, **run.overrides, "seed": run.seed}
    if tokenizer:
        overrides["tokenizer"] = tokenizer
    return load_config(spec.preset, overrides)


def zoo_task(spec: ZooSpec):
    """The zoo's TaskSpec when it trains on a synthetic task, else None."""
    from meshprobe.data.tasks import is_task_spec, parse_task

    data = run_configs(spec, spec.runs[0])[1].data
    return parse_task(data) if is_task_spec(data) else None


def shared_tokenizer(spec: ZooSpec, out: Path) -> Path | None:
    """Train (or reuse) the zoo's one tokenizer and return the path of its tokenizer.json (None for a task)."""
    from meshprobe.data import cached_tokenizer, open_corpus, save_tokenizer

    model_cfg, train_cfg = run_configs(spec, spec.runs[0])
    if zoo_task(spec) is not None:
        return None
    path = out / "tokenizer.json"
    if not path.is_file():
        corpus = open_corpus(train_cfg.data)
        save_tokenizer(cached_tokenizer(corpus, vocab_size=model_cfg.vocab_size), path)
    return path


def train_zoo(spec: ZooSpec, out: str | os.PathLike, only: list[str] | None = None) -> list[dict]:
    """Train every run of the spec (or those whose name or id is in `only`) and update the results file.
    Bad input (an unknown run, an output path that cannot be made, bad data) is refused before `out` exists."""
    from meshprobe.checks import check_out_path
    from meshprobe.training import train

    out = Path(out)
    # Seed 0 of every model first: a zoo stopped halfway is then still one complete family.
    runs = sorted((r for r in spec.runs if not only or r.name in only or r.run_id in only), key=lambda r: r.seed)
    if not runs:
        raise UserError(f"no zoo run matches {only}; runs: {sorted({r.name for r in spec.runs})}")
    check_out_path(out)
    with _io.created_parents(out / RESULTS_FILE):  # removed again if the zoo fails before writing into it
        tokenizer = shared_tokenizer(spec, out)
    for i, run in enumerate(runs, 1):
        model_cfg, train_cfg = run_configs(spec, run, str(tokenizer) if tokenizer else None)
        print(f"[zoo {i}/{len(runs)}] {run.run_id}: {model_cfg.layout} {model_cfg.variant}", file=sys.stderr)
        if train(model_cfg, train_cfg, out / run.run_id, resume=True)["status"] == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C stops the whole zoo (the run saved a checkpoint to resume from)
    return collect_results(spec, out)


def validation_sample(spec: ZooSpec, out: Path):
    """The zoo's shared validation token sample [samples, seq_len] (uniform over the validation split of every
    source), made once from the zoo tokenizer and saved as <out>/val_tokens.npy."""
    import numpy as np

    from meshprobe.data import load_tokenizer, open_corpus, sample_sequences, tokenize_corpus

    path = out / VAL_TOKENS_FILE
    if not path.is_file():
        _, train_cfg = run_configs(spec, spec.runs[0])
        tokenizer = load_tokenizer(out / "tokenizer.json")
        val = tokenize_corpus(open_corpus(train_cfg.data, quiet=True), tokenizer)["val"]
        sample = sample_sequences(val, spec.bundle_samples, spec.bundle_seq_len, seed=0)
        with _io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, sample.astype(np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.uint32),
                    allow_pickle=False)
    return np.load(path, allow_pickle=False)


def earlier_rows(out: Path) -> dict[str, dict]:
    """The rows of <out>/results.json by run id ({} when there is none or it is unreadable)."""
    import json

    try:
        return {r["run"]: r for r in json.loads((out / RESULTS_FILE).read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def collect_results(spec: ZooSpec, out: Path) -> list[dict]:
    """Read every finished run's numbers from its checkpoint, add its loss on the shared validation sample,
    and write <out>/results.json. A run whose folder is gone keeps its row from the earlier results.json
    (marked ``"carried": true``), so a results file can outlive the run folders it was made from."""
    import math

    from meshprobe.checkpoint import load_checkpoint
    from meshprobe.evaluate import sample_loss

    task = zoo_task(spec)
    sample = validation_sample(spec, out) if task is None else None
    rows, earlier = [], earlier_rows(out)
    for run in spec.runs:
        path = out / run.run_id
        if not (path / "config.json").is_file():
            if run.run_id in earlier:
                rows.append({**earlier[run.run_id], "carried": True})
            continue
        model = load_checkpoint(path)
        config = model.checkpoint_config
        meta = config.get("metadata", {})
        counts = model.parameter_counts()
        if task is not None:
            rows.append({"run": run.run_id, "name": run.name, "group": run.group, "seed": run.seed,
                         **task_row(model, task, path)})
            continue
        loss = sample_loss(model, sample)
        rows.append({
            "run": run.run_id, "name": run.name, "group": run.group, "seed": run.seed,
            "layout": config["model"]["layout"], "variant": config["model"]["variant"],
            "mesh_slots": config["model"]["mesh_slots"], "d_model": config["model"]["d_model"],
            "non_embedding_params": counts["non_embedding"], "router_params": counts["router"],
            **{k: meta.get(k) for k in ("step", "total_steps", "tokens_seen", "val_loss", "val_ppl",
                                        "wall_time_s", "device", "status")},
            "sample_loss": loss, "sample_ppl": math.exp(loss),
        })
    _io.write_json(out / RESULTS_FILE, {
        "spec": str(spec.path.name), "description": spec.description,
        "command": f"meshprobe zoo --spec {spec.path.stem} --out {out}", "runs": rows,
    })
    return rows


TASK_EVAL_SEED, TASK_EVAL_SEQUENCES, SOLVE_THRESHOLD = 1, 2048, 0.95


def task_row(model, task, path: Path) -> dict:
    """A task run's results: its config, training status, the training-time curve of task accuracy (evaluation
    seed 0), steps to the first evaluation >= SOLVE_THRESHOLD, and the final accuracy on TASK_EVAL_SEQUENCES
    fresh sequences (evaluation seed TASK_EVAL_SEED, never seen in training or in training-time evaluation)."""
    from meshprobe.evaluate import evaluate_task
    from meshprobe.training.state import read_log

    config = model.checkpoint_config
    meta, mc = config.get("metadata", {}), config["model"]
    evals = [r for r in read_log(path / "train_log.jsonl") if r.get("type") == "eval" and "task_acc" in r]
    solve = next((r["step"] for r in evals if r["task_acc"] >= SOLVE_THRESHOLD), None)
    fresh = evaluate_task(model, task, TASK_EVAL_SEQUENCES, next(model.parameters()).device, chunk=256,
                          seed=TASK_EVAL_SEED)
    return {"layout": mc["layout"], "variant": mc["variant"], "d_model": mc["d_model"],
            "non_embedding_params": model.parameter_counts()["non_embedding"], "task": meta.get("task"),
            **{k: meta.get(k) for k in ("step", "total_steps", "wall_time_s", "device", "status")},
            "steps_to_solve": solve, "solve_threshold": SOLVE_THRESHOLD,
            "curve": [[r["step"], r["task_acc"]] for r in evals],
            "fresh_task_acc": fresh["task_acc"], "fresh_task_acc_by_hops": fresh["task_acc_by_hops"],
            "fresh_loss": fresh["val_loss"], "fresh_targets": fresh["targets"], "fresh_eval_seed": TASK_EVAL_SEED}


def bundle(spec: ZooSpec, out: Path, dest: str | os.PathLike = "checkpoints") -> Path:
    """Copy the bundle runs (seed 0 unless named "name-sN") into `dest` in fp16 without optimizer state, each with
    its own copy of the shared validation token sample (`val_tokens.npy`, so `meshprobe analyze dest/NAME` needs
    no data), plus the shared sample, the results file and a manifest. Figures regenerate from `dest` alone.
    With ``merge = true`` the runs replace same-named models of the bundle already in `dest`, whose other models,
    description and results file stay."""
    import torch

    from meshprobe.checkpoint import load_checkpoint, save_checkpoint
    from meshprobe.data import load_tokenizer

    dest = Path(dest)
    manifest = _merge_target(spec, dest)
    dest.mkdir(parents=True, exist_ok=True)
    task = zoo_task(spec)
    if task is None:
        validation_sample(spec, out)
    entries, rows = [], earlier_rows(out) if manifest is not None else {}
    for entry in spec.bundle_runs:
        run = spec.bundle_run(entry)
        src, name = out / run.run_id, spec.bundle_as.get(entry, run.name)
        model = load_checkpoint(src)
        meta = model.checkpoint_config.get("metadata", {})
        files = {f: (src / f).read_bytes() for f in ("train_log.jsonl",) if (src / f).is_file()}
        if task is None:  # each checkpoint carries its own validation sample: it analyzes on any machine
            files[VAL_TOKENS_FILE] = (out / VAL_TOKENS_FILE).read_bytes()
        save_checkpoint(model, dest / name, tokenizer=load_tokenizer(src, missing_ok=True), files=files,
                        dtype=torch.float16, **meta)
        entries.append({"name": name, "layout": model.cfg.layout, "variant": model.cfg.variant,
                        "spec": spec.path.name, "run": run.run_id})
        if run.run_id in rows:  # a merged model's numbers travel with it
            entries[-1]["result"] = rows[run.run_id]
    command = " ".join(shlex.quote(a) for a in ["meshprobe", "zoo", "--spec", spec.path.stem, "--bundle", str(dest)])
    if manifest is not None:
        names = {e["name"] for e in entries}
        manifest["models"] = [m if m["name"] not in names else next(e for e in entries if e["name"] == m["name"])
                              for m in manifest["models"]] + [e for e in entries if e["name"] not in
                                                              {m["name"] for m in manifest["models"]}]
        merged = {"spec": spec.path.name, "command": command}
        manifest["merged"] = [*(m for m in manifest.get("merged", []) if m != merged), merged]
        _io.write_json(dest / MANIFEST_FILE, manifest)
        return dest
    for name in (VAL_TOKENS_FILE, RESULTS_FILE) if task is None else (RESULTS_FILE,):
        _io.copy_file(out / name, dest / name)
    _io.write_json(dest / MANIFEST_FILE, {"spec": spec.path.name, "description": spec.description, "models": entries,
                                      "val_tokens": VAL_TOKENS_FILE if task is None else None,
                                      "task": task.entry() if task is not None else None, "results": RESULTS_FILE,
                                      "command": command})
    return dest


def _merge_target(spec: ZooSpec, dest: Path) -> dict | None:
    """The manifest a merging bundle updates (None for a plain bundle), checked before anything is written: it
    exists and holds the same task (or the same text data) as the spec."""
    if not spec.bundle_merge:
        return None
    path = dest / MANIFEST_FILE
    manifest = _io.read_json(path) if path.is_file() else None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), list):
        raise UserError(f"{path}: a merging bundle needs an existing bundle there (a zoo.json with a list of models)")
    task = zoo_task(spec)
    if manifest.get("task") != json.loads(json.dumps(task.entry() if task is not None else None)):
        raise UserError(f"{path}: the bundle there holds task {manifest.get('task')}, the spec "
                        f"{task.entry() if task is not None else None}: not merged")
    return manifest
