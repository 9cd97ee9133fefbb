"""Where and how code runs: the device, torchrun's process group (DDP), bf16 autocast, stop signals, output.

Used by training, evaluation and analysis alike. torch is imported inside the functions, so importing this
module stays cheap (``meshprobe --help`` imports no torch).
"""
from __future__ import annotations

import os
import platform
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext

from meshprobe.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None
    return (rank, world, local) if world > 1 else (0, 1, 0)


def dist_env_ok() -> bool:
    """True when torchrun's rank variables (if any) are integers."""
    return all(os.environ.get(k, "0").isdigit() for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(spec: str, local_rank: int = 0):
    """"auto" (CUDA when available), "cpu", "cuda" (= cuda:local_rank) or "cuda:N" -> a torch.device;
    UserError for a device that does not exist here."""
    import torch

    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


# glibc's mallopt parameters (malloc.h) and the values tune_cpu_allocator sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
CPU_ALLOCATOR = {"mmap_threshold": 64 << 20, "trim_threshold": 1 << 30}
_allocator_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory inside the process (glibc only; once per process; True when applied).

    glibc serves an allocation above its mmap threshold (128 KiB at first, raised as chunks are freed, at most
    32 MiB) with fresh pages from the kernel and hands them back on free, and it returns free heap top above
    its trim threshold, so large tensors are page-faulted and zeroed by the kernel again at every step. With
    allocations up to 64 MiB served from the heap and up to 1 GiB of free heap kept, the training benchmark at
    the bundled shape goes from 12,474 to 712 page faults per step, and `meshprobe analyze` of a bundled model
    (500 samples) from 115 s to 97 s of CPU time; the process keeps its peak memory. The command line
    (:func:`meshprobe.cli.main`) calls this once per process; the library never does, so a notebook keeps glibc's
    defaults unless it calls this itself. The training benchmark calls it for all models alike.
    Skipped when the user set any MALLOC_*_ variable (their choice wins) or MESHPROBE_MALLOC=default.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("MESHPROBE_MALLOC") == "default" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, CPU_ALLOCATOR["mmap_threshold"]) == 1
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, CPU_ALLOCATOR["trim_threshold"]) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = ok
    return ok


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def autocast_for(device, precision: str):
    """bf16 autocast on CUDA ("auto"/"bf16"), on CPU only when asked ("bf16"); otherwise a no-op."""
    import torch

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolved_precision(device, precision: str) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@contextmanager
def process_group(world: int, device):
    """Initialise torch.distributed for `world` > 1 processes (NCCL on CUDA, gloo on CPU) unless the caller
    already did, and tear it down again on exit; a no-op for one process, except under torchrun, where the
    group is set up even for one process so `torchrun --nproc_per_node 1` exercises the DDP + NCCL path."""
    own = False
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own = True
    try:
        yield
    finally:
        if own:
            import torch.distributed as dist

            dist.destroy_process_group()


def dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce_(tensor, world: int):
    """Sum `tensor` over all processes in place (no-op for one process); returns it."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` (restored afterwards); ``None`` = leave as is.

    The per-sample statistics and probe updates are many small ops (256 x 128 matrices); with two OpenMP
    threads on a shared 2-core machine they were measured 10-100x slower than with one (the threads wait for
    each other whenever another process holds a core). :class:`Analyzer` therefore runs them with
    ``small_op_threads`` (1) on CPU; the forward and the lens use ``analyze_model(threads=...)``.
    """
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class StopRequest:
    """SIGINT/SIGTERM -> `requested` becomes True (finish the step, save, stop). A second SIGINT raises
    KeyboardInterrupt at once (no save)."""

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nmeshprobe train: stopping after this step and saving a checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


def is_terminal(stream) -> bool:
    """True for a terminal with a known width (a pty of width 0 would get an empty progress bar)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def say(show: bool, msg: str, bar=None) -> None:
    """Print a progress message on stderr (through the tqdm bar when one is live)."""
    if not show:
        return
    if bar is not None and not bar.disable:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
