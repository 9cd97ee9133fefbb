"""The training loop: setup, step, log, save. Vanilla, recursive and MeSH models, exact resume, multi-GPU (DDP).

    from meshprobe.training import load_config, train
    model_cfg, train_cfg = load_config("tiny", ["--variant", "mesh", "--steps", "200"])
    summary = train(model_cfg, train_cfg, "checkpoints/tiny-mesh")

Choices the paper leaves open:

* Weight decay applies to every parameter with two or more dimensions (all linear weight matrices including
  the MeSH routers, the token embedding and the unembedding); biases, LayerNorm gains/biases and the
  ``static_comb`` scalars are not decayed (:func:`param_groups`).
* Loss: mean next-token cross-entropy over all ``batch_size * seq_len`` predictions of the step, in fp32 from
  the logits (:func:`meshprobe.evaluate.compute_loss`). Task data (``--data task:...``): masked targets, no
  shift, task accuracy in the eval records, ``stop_acc`` -- see :mod:`meshprobe.training.taskdata`.
* Data: the global batch at step ``s`` is a pure function of ``(seed, s)`` (:func:`meshprobe.data.get_batch`),
  so a checkpoint's data position is just its step, and W processes (rank r takes rows ``[r*B/W, (r+1)*B/W)``)
  see exactly the batch one process would. The tokenizer is a byte-level BPE trained on the corpus' train
  split (cached by corpus fingerprint), or the train config's ``tokenizer`` (a tokenizer.json or a checkpoint
  directory) so that a family of models shares one. It is saved into every checkpoint and reused on resume.

Output directory = checkpoint (:mod:`meshprobe.checkpoint` + :mod:`meshprobe.training.state`), written
atomically (safe against SIGKILL at any instant; a resume reads the newest complete save) at step 0, every ``save_every`` steps, on Ctrl-C and at the end. ``config.json`` metadata: the
train config, step, total_steps, tokens_seen, wall_time_s, train_loss, val_loss, val_ppl, device, world_size,
data (spec, fingerprint, token counts), status, complete, meshprobe / torch versions. While training, rank 0
holds an advisory lock ``.NAME.lock`` beside the real ``out_dir`` (symlinks resolved): a second process
training into the same directory stops with a UserError. On resume the log is cut back to the checkpoint's step, so a resumed run's log equals
the uninterrupted run's (apart from timing fields).

Log records: ``{"type": "train", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}``
every ``log_every`` steps and at the end (``loss`` is the mean over the steps since the previous record; ``lr``
and ``grad_norm`` (before clipping) are the last step's), and ``{"type": "eval", "step", "tokens", "val_loss",
"val_ppl"}`` every ``eval_every`` steps and at the end. ``step`` counts completed optimizer steps.

Stopping: Ctrl-C (SIGINT) or SIGTERM finishes the step, saves and returns ``status == "interrupted"`` (a second
Ctrl-C aborts at once; the last checkpoint stays intact). ``stop_after = N`` trains N steps of the full
schedule, saves and returns ``status == "stopped"``. A NaN/inf loss raises :class:`TrainingDiverged` naming the
step; nothing is saved after it. On CPU every step is checked; on CUDA the check runs at logging, evaluation
and save steps (to avoid a device sync per step), always before anything is saved. Under DDP the ranks agree
on stopping at the next logging step.

Multi-GPU: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (NCCL on CUDA, gloo on
CPU), the model is wrapped in DistributedDataParallel, and each rank trains on its rows of the global batch.
Only rank 0 prints, logs and writes checkpoints; logged losses are averaged over ranks. ``micro_batch_size``
splits each rank's rows into gradient-accumulation micro-batches.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import meshprobe
from meshprobe import _io, data
from meshprobe.checks import check_out_path
from meshprobe.checkpoint import TOKENIZER_FILE, load_checkpoint, resolve_checkpoint, save_checkpoint
from meshprobe.config import ModelConfig
from meshprobe.errors import UserError
from meshprobe.evaluate import compute_loss, evaluate, ppl
from meshprobe.model import build_model
from meshprobe.runtime import (StopRequest, all_reduce_, autocast_for, barrier, device_name, dist_env,
                               dist_initialized, is_terminal, process_group, resolve_device, resolved_precision,
                               say)
from meshprobe.training import state as S, taskdata
from meshprobe.training.config import TrainConfig, lr_at

# Test hook (monkeypatched by tests): called after every optimizer step with the number of completed steps.
_step_hook = None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. The message names the step; the last good checkpoint is kept."""


def param_groups(model, weight_decay: float) -> tuple[list[str], list[dict]]:
    """AdamW parameter groups: (names in optimizer order, [decayed group, non-decayed group]).

    Decayed: every parameter with >= 2 dimensions (linear weights incl. MeSH routers, embedding, unembedding).
    Not decayed: biases, LayerNorm weights/biases, the static_comb scalars.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    return names, [{"params": [p for _, p in decay], "weight_decay": weight_decay},
                   {"params": [p for _, p in no_decay], "weight_decay": 0.0}]


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          overwrite: bool = False, *, quiet: bool = False) -> dict:
    """Train a model and write the checkpoint directory `out_dir`; return a summary dict.

    resume: continue the checkpoint in `out_dir` (model, optimizer, RNG states, step, log). When `out_dir` does
        not exist the run starts fresh. The model config must equal the checkpoint's; train settings may
        change (e.g. more `steps`), which changes the schedule from then on.
    overwrite: replace an existing checkpoint in `out_dir` (a non-checkpoint, non-empty directory is refused).
    quiet: no progress output (errors still raise).

    Summary keys: out_dir, status ("completed", "interrupted", "stopped"), step, total_steps, tokens_seen,
    train_loss, val_loss, val_ppl, wall_time_s, tokens_per_s (this invocation), device, world_size.
    Raises UserError for bad input (before anything is written) and TrainingDiverged on a NaN/inf loss.
    """
    given = str(out_dir)
    out_dir = check_out_path(out_dir, name="out_dir")  # the real folder: a symlink to a live run shares its lock
    rank, world, local_rank = dist_env()
    if train_cfg.seq_len > model_cfg.n_ctx:
        raise UserError(f"seq_len {train_cfg.seq_len} is above the model context n_ctx={model_cfg.n_ctx}")
    if train_cfg.batch_size % world:
        raise UserError(f"batch_size {train_cfg.batch_size} does not divide across {world} processes")
    per_rank = train_cfg.batch_size // world
    micro = train_cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"micro_batch_size {micro} does not divide the {per_rank} sequences per process")
    with ExitStack() as stack:
        # rank 0 locks .NAME.lock beside the folder; when the parent folder does not exist yet, nothing is
        # created before setup succeeded: the lock is taken right before the first write (_begin_writing)
        lock_now = rank == 0 and out_dir.parent.is_dir()
        if lock_now:
            stack.enter_context(_io.out_lock(out_dir, "train"))
        show = rank == 0 and not quiet
        src = resolve_checkpoint(out_dir)
        resuming = S.check_resume(model_cfg, train_cfg, out_dir, src, resume, overwrite, show)
        device = resolve_device(train_cfg.device, local_rank)
        with process_group(world, device):
            run = setup(model_cfg, train_cfg, out_dir, resuming, device, rank, world, micro, show, src)
            if rank == 0 and not lock_now:
                run.take_lock = lambda: stack.enter_context(_io.out_lock(out_dir, "train"))
            return {**_loop(run), "out_dir": given}


# ---------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training invocation holds: built by :func:`setup`, advanced by :func:`_loop`."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    out_dir: Path
    device: torch.device
    precision: str
    rank: int
    world: int
    micro: int
    show: bool
    resuming: bool = False
    device_name: str = ""
    counts: dict = field(default_factory=dict)
    corpus: object = None
    tokenizer: object = None
    train_tokens: object = None
    val_tokens: object = None
    data_meta: dict = field(default_factory=dict)
    task: object = None  # a meshprobe.data.tasks.TaskSpec when training on a task (then no corpus / tokenizer)
    model: torch.nn.Module | None = None
    fwd_model: torch.nn.Module | None = None
    ddp: object = None
    optimizer: torch.optim.Optimizer | None = None
    param_names: list = field(default_factory=list)
    params: list = field(default_factory=list)
    step: int = 0
    prior_wall: float = 0.0
    window: list = field(default_factory=list)  # losses since the last train record
    pending: list = field(default_factory=list)  # this step's losses (device tensors) not yet reduced / checked
    records: list = field(default_factory=list)
    last_val: dict = field(default_factory=dict)
    t_start: float = 0.0
    tokens_run: int = 0
    lr: float = 0.0
    src: Path | None = None  # the folder a resumed checkpoint is read from (see checkpoint.resolve_checkpoint)
    take_lock: object = None  # set when the output lock is taken only at the first write (state.begin_writing)

    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps

    def elapsed(self) -> float:
        return round(self.prior_wall + time.time() - self.t_start, 3)


def setup(model_cfg, cfg, out_dir, resuming, device, rank, world, micro, show, src=None) -> Run:
    """Data and tokenizer, model and optimizer (restored on resume), compile and DDP; nothing written yet."""
    run = Run(cfg, model_cfg, out_dir, device, resolved_precision(device, cfg.precision), rank, world, micro, show,
              resuming, device_name(device), src=src or out_dir)
    S.check_train_memory(model_cfg, device)
    S.check_batch_memory(model_cfg, cfg, cfg.batch_size // world, micro, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    taskdata.setup_task(run) if taskdata.tasks.is_task_spec(cfg.data) else _setup_data(run, resuming)
    if resuming:
        run.model = load_checkpoint(run.src, device=device)
    else:
        torch.manual_seed(cfg.seed)
        run.model = build_model(model_cfg).to(device)
    run.model.train()
    run.counts = run.model.parameter_counts()
    run.param_names, groups = param_groups(run.model, cfg.weight_decay)
    run.params = [p for g in groups for p in g["params"]]
    # Fused AdamW on every device: on CPU too it is one kernel over all tensors instead of ~12 small ops per
    # parameter tensor (which made MeSH's 16 small router tensors cost as much as big ones).
    run.optimizer = torch.optim.AdamW(groups, lr=lr_at(0, run.total_steps, cfg.lr, cfg.warmup_frac, cfg.min_lr_frac),
                                      betas=cfg.betas, eps=cfg.eps, fused=True)
    if resuming:
        _restore(run)
    _wrap(run)
    run.t_start = time.time()
    return run


def _setup_data(run: Run, resuming: bool) -> None:
    """Corpus, tokenizer and token arrays; every check happens before anything is written."""
    cfg = run.cfg
    corpus = data.open_corpus(cfg.data, quiet=run.rank != 0)
    if resuming and (run.src / TOKENIZER_FILE).is_file():
        tokenizer, tok_source = data.load_tokenizer(run.src / TOKENIZER_FILE), "checkpoint"
    elif cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"tokenizer not found: {cfg.tokenizer} (give a tokenizer.json or a checkpoint directory)")
        tokenizer, tok_source = data.load_tokenizer(path), str(path)
    else:
        def announce():
            say(run.show, f"meshprobe train: training a tokenizer for {corpus.name} (byte-level BPE, "
                          f"{run.model_cfg.vocab_size} tokens)")

        tokenizer = data.cached_tokenizer(corpus, vocab_size=run.model_cfg.vocab_size, on_train=announce)
        tok_source = "trained"
    if tokenizer.get_vocab_size() > run.model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                        f"vocab_size {run.model_cfg.vocab_size}")
    tokens = data.tokenize_corpus(corpus, tokenizer)
    train_tokens, val_tokens = tokens["train"], tokens["val"]
    if len(train_tokens) < cfg.seq_len + 1:
        raise UserError(f"data {corpus.name}: {len(train_tokens)} training tokens, need at least seq_len + 1 = "
                        f"{cfg.seq_len + 1}")
    if cfg.eval_batches > 0 and len(val_tokens) < cfg.seq_len + 1:
        raise UserError(f"data {corpus.name}: {len(val_tokens)} validation tokens, need at least seq_len + 1 = "
                        f"{cfg.seq_len + 1} (or set eval_batches 0)")
    run.corpus, run.tokenizer, run.train_tokens, run.val_tokens = corpus, tokenizer, train_tokens, val_tokens
    run.data_meta = {"spec": cfg.data, "fingerprint": corpus.fingerprint, "train_tokens": int(len(train_tokens)),
                     "val_tokens": int(len(val_tokens)), "tokenizer": tok_source,
                     "tokenizer_vocab_size": tokenizer.get_vocab_size()}


def _restore(run: Run) -> None:
    """Optimizer, RNG states, step, loss window, last validation and the log (cut back to the step); a damaged
    file is a one-line UserError naming it."""
    src = run.src
    state = S.read_state(src)
    S.load_optimizer_state(run.optimizer, src / S.OPTIMIZER_FILE, state["optimizer"], run.param_names, run.params)
    S.load_rng_state(src / S.RNG_FILE, state["rng"], run.device)
    try:
        run.step = int(state["step"])
        run.prior_wall = float(state.get("wall_time_s", 0.0))
        run.window = [float(v) for v in state.get("window_losses", [])]
        run.last_val = dict(state.get("last_val", {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{src / S.STATE_FILE}: damaged ({exc})") from None
    run.records = S.read_log(src / S.LOG_FILE, max_step=run.step)


def _wrap(run: Run) -> None:
    """torch.compile first, then DistributedDataParallel (the nanoGPT order; no_sync works on the wrapper)."""
    run.fwd_model = torch.compile(run.model) if run.cfg.compile else run.model
    if run.world > 1 or dist_initialized():
        from torch.nn.parallel import DistributedDataParallel

        # No buffer syncing in forward: the only buffers are the constant rotary tables.
        no_sync_buffers = ({"forward_sync_buffers": False}  # torch >= 2.13
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        device = run.device
        run.ddp = DistributedDataParallel(run.fwd_model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **no_sync_buffers)
        run.fwd_model = run.ddp


# ---------------------------------------------------------------------------------------------------------
# step
# ---------------------------------------------------------------------------------------------------------
def train_step(run: Run) -> float:
    """One optimizer step at `run.step` (gradient accumulation over micro-batches); returns the grad norm.
    The step's loss stays on the device in `run.pending` until :func:`check_losses`."""
    cfg, micro = run.cfg, run.micro
    run.lr = lr_at(run.step, run.total_steps, cfg.lr, cfg.warmup_frac, cfg.min_lr_frac)
    for g in run.optimizer.param_groups:
        g["lr"] = run.lr
    x_np, y_np = (taskdata.step_batch(run) if run.task is not None else
                  data.get_batch(run.train_tokens, cfg.batch_size, cfg.seq_len, run.step, cfg.seed, run.rank, run.world))
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    if run.device.type == "cuda":
        x, y = x.pin_memory().to(run.device, non_blocking=True), y.pin_memory().to(run.device, non_blocking=True)
    n_micro = (cfg.batch_size // run.world) // micro
    loss_sum = None
    for i in range(n_micro):
        sync = run.ddp.no_sync() if (run.ddp is not None and i < n_micro - 1) else nullcontext()
        with sync:
            with autocast_for(run.device, run.precision):
                loss = compute_loss(run.fwd_model, x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro])
            (loss / n_micro if n_micro > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.pending.append(loss_sum / n_micro if n_micro > 1 else loss_sum)
    run.step += 1
    run.tokens_run += cfg.tokens_per_step
    if _step_hook is not None:
        _step_hook(run.step)
    return grad_norm


def check_losses(run: Run) -> None:
    """Reduce pending losses over ranks, check them, move them into the logging window."""
    if not run.pending:
        return
    vals = all_reduce_(torch.stack(run.pending), run.world)
    values = (vals / run.world if run.world > 1 else vals).tolist()
    first = run.step - len(values) + 1
    for i, v in enumerate(values):
        if not math.isfinite(v):
            last = S.read_state_step(run.out_dir)
            raise TrainingDiverged(
                f"loss is {v} at step {first + i} (lr {run.lr:.3g}); stopped without saving, the last good "
                f"checkpoint in {run.out_dir} (step {last}) is kept")
    run.window.extend(values)
    run.pending = []


def stop_requested(run: Run, stop: StopRequest, need_log: bool) -> bool:
    """Ctrl-C seen (by any rank under DDP: the ranks agree at logging steps)."""
    if run.world == 1:
        return stop.requested
    if not need_log:
        return False
    flag = all_reduce_(torch.tensor([1.0 if stop.requested else 0.0], device=run.device), run.world)
    return flag.item() > 0


# ---------------------------------------------------------------------------------------------------------
# log and save
# ---------------------------------------------------------------------------------------------------------
def emit(run: Run, record: dict) -> None:
    """Add a record to the log (appended live to train_log.jsonl on rank 0)."""
    run.records.append(record)
    if run.rank == 0:
        _io.append_jsonl(run.out_dir / S.LOG_FILE, record)


def log_train(run: Run, grad_norm, timer: dict, bar) -> None:
    now = time.time()
    tps = (run.tokens_run - timer["tokens"]) / max(now - timer["t"], 1e-9)
    timer.update(t=now, tokens=run.tokens_run)
    rec = {"type": "train", "step": run.step, "tokens": run.step * run.cfg.tokens_per_step,
           "loss": sum(run.window) / len(run.window), "lr": run.lr, "grad_norm": float(grad_norm),
           "tokens_per_s": round(tps, 1), "elapsed_s": round(run.prior_wall + now - run.t_start, 3)}
    run.window = []
    emit(run, rec)
    if bar is not None and not bar.disable:
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{run.lr:.2e}", tok_s=f"{tps:,.0f}")
    else:
        say(run.show, f"step {run.step}/{run.total_steps} | loss {rec['loss']:.4f} | lr {run.lr:.2e} | "
                      f"{tps:,.0f} tok/s")


def log_eval(run: Run, timer: dict, bar) -> None:
    cfg, t_eval = run.cfg, time.time()
    val_loss, extra = taskdata.eval_task(run) if run.task is not None else (evaluate(
        run.model, run.val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches, run.device, run.precision,
        run.rank, run.world, chunk=run.micro)[0], {})
    run.last_val = {"step": run.step, "val_loss": val_loss, "val_ppl": ppl(val_loss), **extra}
    emit(run, {"type": "eval", "step": run.step, "tokens": run.step * cfg.tokens_per_step,
               "val_loss": val_loss, "val_ppl": run.last_val["val_ppl"], **extra})
    say(run.show, f"step {run.step}/{run.total_steps} | val loss {val_loss:.4f} | val ppl {run.last_val['val_ppl']:.2f}"
                  + (f" | task acc {extra['task_acc']:.4f}" if extra else ""), bar)
    timer["t"] += time.time() - t_eval  # keep evaluation out of the next tokens/s figure


def metadata(run: Run, status: str) -> dict:
    """The config.json metadata of a checkpoint at `run.step`."""
    last_train = next((r for r in reversed(run.records) if r["type"] == "train"), {})
    step, last_val = run.step, run.last_val
    return {
        "train": run.cfg.to_dict(), "step": step, "total_steps": run.total_steps,
        "tokens_seen": step * run.cfg.tokens_per_step, "complete": step >= run.total_steps, "status": status,
        "wall_time_s": run.elapsed(), "train_loss": last_train.get("loss"),
        "val_loss": last_val.get("val_loss"), "val_ppl": last_val.get("val_ppl"), "val_step": last_val.get("step"),
        "device": run.device_name, "world_size": run.world, "precision": run.precision,
        "ddp_backend": torch.distributed.get_backend() if run.ddp is not None else None,
        "data": run.data_meta, "parameters": run.counts,
        **({"task": run.task.entry(), "task_acc": last_val.get("task_acc")} if run.task is not None else {}),
        "meshprobe_version": meshprobe.__version__, "torch_version": torch.__version__,
    }


def save(run: Run, status: str) -> None:
    """Write the checkpoint (model, tokenizer, optimizer, RNG, training state, log) atomically on rank 0."""
    if run.rank == 0:
        opt_bytes, opt_meta = S.optimizer_state_files(run.optimizer, run.param_names)
        rng_bytes, rng_meta = S.rng_state_files(run.device)
        state = {"format": S.STATE_FORMAT, "version": S.STATE_VERSION, "step": run.step,
                 "total_steps": run.total_steps, "tokens_seen": run.step * run.cfg.tokens_per_step,
                 "wall_time_s": run.elapsed(), "window_losses": run.window, "last_val": run.last_val,
                 "world_size": run.world, "optimizer": opt_meta, "rng": rng_meta}
        files = {S.OPTIMIZER_FILE: opt_bytes, S.RNG_FILE: rng_bytes, S.STATE_FILE: json.dumps(state),
                 S.LOG_FILE: _io.jsonl_text(run.records)}
        save_checkpoint(run.model, run.out_dir, tokenizer=run.tokenizer, files=files, **metadata(run, status))
    barrier(run.world)


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------
def _banner(run: Run, resuming: bool) -> None:
    mc, cfg, counts = run.model_cfg, run.cfg, run.counts
    say(run.show, f"meshprobe train: {mc.layout} {mc.variant} (unrolled depth {mc.unrolled_depth}), "
                  f"{counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding); "
                  f"{run.total_steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens on {run.device_name}"
                  f"{f' x {run.world} processes' if run.world > 1 else ''}, {run.precision}; data "
                  + (taskdata.describe(run) if run.task is not None else f"{run.corpus.name} "
                     f"({len(run.train_tokens):,} train / {len(run.val_tokens):,} val tokens)")
                  + (f"; resuming at step {run.step}" if resuming else ""))


def _loop(run: Run) -> dict:
    cfg, total = run.cfg, run.total_steps
    _banner(run, run.resuming)
    if run.rank == 0:
        S.begin_writing(run.out_dir, run.take_lock)
    if not run.resuming:
        save(run, "started")  # creates (or replaces, with overwrite) out_dir; the live log is appended to it
        S.keep_snapshot(run, metadata)
    elif run.rank == 0:
        _io.write_text(run.out_dir / S.LOG_FILE, _io.jsonl_text(run.records))  # cut back to the checkpoint
    status, timer, bar = "completed", {"t": time.time(), "tokens": 0}, None
    if run.show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=run.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not is_terminal(sys.stderr), desc="train")
    try:
        with StopRequest(announce=run.show) as stop:
            while run.step < total and not taskdata.solved(run):
                grad_norm = train_step(run)
                step, last = run.step, run.step == total
                need_log = step % cfg.log_every == 0 or last
                need_eval = cfg.eval_batches > 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
                need_save = bool(cfg.save_every and step % cfg.save_every == 0) or last
                stop_now = stop_requested(run, stop, need_log) and not last
                stopped_after = cfg.stop_after is not None and step == cfg.stop_after and not last
                if run.device.type == "cpu" or need_log or need_eval or need_save or stop_now or stopped_after:
                    check_losses(run)
                if bar is not None:
                    bar.update(1)
                if need_log:
                    log_train(run, grad_norm, timer, bar)
                if need_eval:
                    log_eval(run, timer, bar)
                S.keep_snapshot(run, metadata)  # with keep_every, at its steps
                solved_now = need_eval and taskdata.solved(run) and not last
                if stop_now or stopped_after or solved_now:
                    status = "solved" if solved_now else "interrupted" if stop_now else "stopped"
                    save(run, status)
                    break
                if need_save:
                    save(run, "completed" if last else "running")
    finally:
        if bar is not None:
            bar.close()
    return _summary(run, status)


def _summary(run: Run, status: str) -> dict:
    wall = time.time() - run.t_start
    summary = {
        "out_dir": str(run.out_dir), "status": status, "step": run.step, "total_steps": run.total_steps,
        "tokens_seen": run.step * run.cfg.tokens_per_step,
        "train_loss": next((r["loss"] for r in reversed(run.records) if r["type"] == "train"), None),
        "val_loss": run.last_val.get("val_loss"), "val_ppl": run.last_val.get("val_ppl"),
        "task_acc": run.last_val.get("task_acc"), "wall_time_s": round(run.prior_wall + wall, 3),
        "tokens_per_s": round(run.tokens_run / max(wall, 1e-9), 1),
        "device": run.device_name, "world_size": run.world,
    }
    if run.show and status == "solved":
        say(run.show, taskdata.solved_message(run, wall))
    elif run.show and status == "completed":
        val = f", val loss {summary['val_loss']:.4f}, ppl {summary['val_ppl']:.2f}" if run.cfg.eval_batches > 0 else ""
        say(run.show, f"meshprobe train: done, {run.step} steps{val}, {wall:.1f} s; checkpoint {run.out_dir}")
    return summary
