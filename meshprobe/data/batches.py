"""Batches from a token array: the training batch of a step, evaluation windows, random samples."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from meshprobe.errors import UserError


def _check_tokens(tokens: np.ndarray, seq_len: int, what: str = "tokens") -> None:
    if seq_len < 1:
        raise UserError(f"seq_len must be positive, not {seq_len}")
    if len(tokens) < seq_len + 1:
        raise UserError(f"{what}: {len(tokens)} tokens, need at least seq_len + 1 = {seq_len + 1}")


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, step: int, seed: int,
              rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This rank's share ``(x, y)`` of the global training batch at `step`; int64, shape [batch_size // world_size,
    seq_len], ``y`` = ``x`` shifted by one token.

    The global batch is a pure function of ``(seed, step)``: ``np.random.default_rng([seed, step])`` draws
    `batch_size` start offsets uniformly in ``[0, len(tokens) - seq_len - 1]``. Rank r takes the contiguous rows
    ``[r * B/W, (r+1) * B/W)``, so W ranks together see exactly the 1-process batch, and resuming at a step
    reproduces the batches that an uninterrupted run would have seen.
    """
    if batch_size < 1 or world_size < 1:
        raise UserError(f"batch_size and world_size must be positive (got {batch_size}, {world_size})")
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} out of range for world_size {world_size}")
    if step < 0 or seed < 0:
        raise UserError(f"step and seed must be non-negative (got {step}, {seed})")
    _check_tokens(tokens, seq_len)
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    per = batch_size // world_size
    mine = starts[rank * per:(rank + 1) * per]
    window = np.asarray(tokens[mine[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return window[:, :-1], window[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows of `seq_len` (+1 target) tokens, grouped into batches of `batch_size` (the last one
    may be smaller). With `max_batches`, the windows are spread evenly over all of `tokens`, so a short
    evaluation still sees every source of a mixed validation split, not just the first one."""
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, not {batch_size}")
    _check_tokens(tokens, seq_len, "validation tokens")
    available = (len(tokens) - 1) // seq_len
    n_windows = available if max_batches is None else min(available, max_batches * batch_size)
    window_ids = (np.arange(n_windows) * available) // n_windows  # evenly spaced, strictly increasing
    offsets = np.arange(seq_len + 1)
    for b in range(0, n_windows, batch_size):
        starts = window_ids[b:b + batch_size] * seq_len
        window = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64)
        yield window[:, :-1], window[:, 1:]


def sample_sequences(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """`n` windows of `seq_len` tokens at random offsets, a pure function of (tokens, n, seq_len, seed); int64."""
    if n < 0 or seed < 0:
        raise UserError(f"n and seed must be non-negative (got {n}, {seed})")
    if seq_len < 1 or len(tokens) < seq_len:
        raise UserError(f"tokens: {len(tokens)} tokens, need at least seq_len = {seq_len}")
    rng = np.random.default_rng([int(seed), 0x5EC5])
    starts = rng.integers(0, len(tokens) - seq_len + 1, size=n)
    return np.asarray(tokens[starts[:, None] + np.arange(seq_len)], dtype=np.int64)
