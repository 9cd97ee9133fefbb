"""What the crosscoder of one model reads: the model (a meshprobe checkpoint, a ground-truth task checkpoint
or a transformers looped directory), its tokens, and how to show a token context.

Tokens come from the one token resolver (:func:`~meshprobe.analysis.pipeline.tokens.resolve_tokens`):

* text checkpoints: a token file, else the checkpoint's own ``val_tokens.npy``, else windows of its corpus;
  contexts through its tokenizer;
* task checkpoints (metadata ``task``): a fresh evaluation set of the task (``samples`` sequences), with the
  targets (the answer of each position) and the hop latents; contexts as symbol ids;
* transformers directories: windows of ``data`` through the directory's tokenizer; contexts through it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from meshprobe.errors import UserError

__all__ = ["ModelInput", "load_model", "model_input", "context_text"]

DEFAULT_TASK_SAMPLES = 2000


@dataclass
class ModelInput:
    """tokens [N, seq]; targets [N, seq] (negative = none) for tasks, else None (next token); latents [N, hops,
    seq] for tasks; ``decode(ids) -> str``; ``source``: where the tokens came from."""

    tokens: torch.Tensor
    source: str
    decode: Callable[[list[int]], str]
    targets: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    task: dict | None = None


def load_model(path: str | os.PathLike, device="cpu", trust_remote_code: bool = False):
    """A meshprobe checkpoint or a transformers looped directory (:mod:`meshprobe.hf`), loaded."""
    from meshprobe.checkpoint import load_checkpoint
    from meshprobe.hf.loader import is_hf_dir, load

    p = Path(path)
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if is_hf_dir(p):
        model = load(p, device=device, trust_remote_code=trust_remote_code)
        model.checkpoint_dir = p
        return model
    return load_checkpoint(p, device=device)


def _ids(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


def model_input(model, path: Path | None, *, tokens=None, samples: int | None = None, seq_len: int | None = None,
                data=None, seed: int = 0) -> ModelInput:
    """The tokens a model's crosscoder reads (see the module docstring); ``tokens``: an array / tensor or a
    .npy path that overrides the default."""
    from meshprobe.analysis.pipeline.tokens import TokenRequest, resolve_tokens, task_batch

    is_hf = getattr(model.cfg, "is_hf", False)
    task = None if is_hf else (getattr(model, "checkpoint_config", None) or {}).get("metadata", {}).get("task")
    if task is not None and tokens is None:  # the resolver's task rule, with the targets and latents kept
        samples = samples or DEFAULT_TASK_SAMPLES
        batch, spec = task_batch(model, TokenRequest(samples=samples, seed=seed))
        return ModelInput(torch.from_numpy(batch.tokens), f"{samples} fresh sequences of {spec.spec_string()} "
                          f"(seed {seed})", _ids, targets=torch.from_numpy(batch.targets),
                          latents=torch.from_numpy(batch.latents), task=spec.entry())
    label = None if isinstance(tokens, (str, os.PathLike)) else "given tokens"  # a path names itself
    rows, source = resolve_tokens(model, path, TokenRequest(tokens, samples, seq_len, seed, data, label))
    return ModelInput(rows, source, _decoder(model, path, is_hf))


def _decoder(model, path: Path | None, is_hf: bool) -> Callable[[list[int]], str]:
    """ids -> text through the model's tokenizer; ids as numbers when it has none."""
    tok: Any = None
    if path is not None and is_hf:
        from meshprobe.hf.loader import load_tokenizer

        tok = load_tokenizer(path, trust_remote_code=getattr(model, "trust_remote_code", False))
    elif path is not None:
        from meshprobe.data import load_tokenizer

        tok = load_tokenizer(path, missing_ok=True)
    if tok is None:
        return _ids
    return lambda ids: tok.decode([int(i) for i in ids])


def context_text(decode: Callable[[list[int]], str], tokens: torch.Tensor, seq: int, pos: int,
                 before: int = 8) -> str:
    """Up to ``before`` tokens of context, then the token at ``pos`` in double angle brackets."""
    row = tokens[seq].tolist()
    return f"{decode(row[max(0, pos - before):pos])}«{decode([row[pos]])}»"
