"""`meshprobe analyze --dynamics --tuned-lens`: the loop-dynamics sections of one model's metrics entry, the saved
lenses and the figures (:mod:`meshprobe.dynamics.analyze` does the work; this is the glue to the pipeline).

The dynamics run on the first ``samples`` sequences of the analysis tokens cut to ``seq_len`` tokens (the
Jacobian spectra cost ~3 x iters backward passes of one step per step run); the tuned lens is fitted on the
first three quarters of up to ``lens_samples`` sequences and scored on the rest. Nothing is written until the
analysis folder is published: lenses are saved into the staging folder with the figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meshprobe.errors import UserError

# option -> the parameter name its errors use (the CLI prints it as the flag: --dynamics-samples, ...)
PARAMS = {"samples": "dynamics_samples", "seq_len": "dynamics_seq_len", "iters": "dynamics_iters", "k": "dynamics_k",
          "lens_samples": "lens_samples"}
__all__ = ["DynamicsOptions", "check_options", "check_model_config", "dynamics_entry", "write_dynamics"]


@dataclass
class DynamicsOptions:
    """What `--dynamics` / `--tuned-lens` ask for (defaults sized for a CPU: about a minute per small model)."""

    dynamics: bool = False
    tuned_lens: bool = False
    lens: str | None = None  # a saved lens folder to score instead of fitting one
    steps: int | None = None  # loop steps to run (default 4 x K or the model's limit)
    samples: int = 4
    seq_len: int = 64
    iters: int = 20
    k: int = 4
    lens_samples: int = 32
    fit_steps: int = 100

    @property
    def active(self) -> bool:
        return self.dynamics or self.tuned_lens or self.lens is not None


def check_options(opts: DynamicsOptions) -> None:
    """UserError (naming the parameter) for option values no model can run."""
    for name, param in PARAMS.items():
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{param}={v!r} must be a positive integer")
    if opts.steps is not None and (not isinstance(opts.steps, int) or opts.steps < 1):
        raise UserError(f"dynamics_steps={opts.steps!r} must be a positive integer")
    if opts.iters < opts.k:
        raise UserError(f"dynamics_iters={opts.iters} must be >= dynamics_k={opts.k}")
    if opts.fit_steps < 0:
        raise UserError(f"lens_fit_steps={opts.fit_steps} must be >= 0")
    if opts.lens is not None:
        from meshprobe.dynamics.lens import META

        if not (Path(opts.lens) / META).is_file():
            raise UserError(f"lens={opts.lens!r} is not a saved tuned lens (no {META} there)")


def check_model_config(cfg, opts: DynamicsOptions, where: str) -> None:
    """Before any work, from a model config alone (meshprobe checkpoints): a looped model that can run the
    steps asked for."""
    if not opts.active:
        return
    if cfg.is_vanilla:
        raise UserError(f"{where}: a {cfg.variant} model with layout {cfg.layout!r} has no loop steps (--dynamics / "
                        "--tuned-lens need a looped model)")
    limit = cfg.n_loops if (not cfg.shared or cfg.variant in cfg.PER_STEP_VARIANTS) else None
    if opts.steps is not None and limit is not None and opts.steps > limit:
        raise UserError(f"dynamics_steps={opts.steps}: {where} is a {cfg.variant} model with parameters for its "
                        f"{limit} loop steps only")


def dynamics_entry(model, tokens, opts: DynamicsOptions) -> tuple[dict, object | None]:
    """({"dynamics": ..., "tuned_lens": ...} for the model's metrics entry, the fitted lens or None)."""
    from meshprobe.dynamics.analyze import check_model, dynamics_section, lens_section

    if not opts.active:
        return {}, None
    check_model(model, opts.steps, "dynamics_steps")
    out, lens = {}, None
    dev = next(model.parameters()).device
    if opts.dynamics:
        x = tokens[: opts.samples, : opts.seq_len].to(dev)
        out["dynamics"] = dynamics_section(model, x, steps=opts.steps, k=opts.k, iters=opts.iters)
    if opts.tuned_lens or opts.lens is not None:
        x = tokens[: opts.lens_samples, : opts.seq_len].to(dev)
        lens, sec = lens_section(model, x, lens=opts.lens, fit_steps=opts.fit_steps)
        sec["saved"] = None
        out["tuned_lens"] = sec
        lens = lens if sec["fitted"] else None
    return out, lens


def write_dynamics(tmp: Path, results: list[dict], lenses: list, folders: list[str]) -> None:
    """Into the staging folder: each fitted lens in ``<folder>/tuned_lens`` (and its path in the entry), the
    dynamics and lens figures beside the other figures."""
    from meshprobe.analysis.plots.dynamics import plot_dynamics, plot_lens_kl

    for res, lens, folder in zip(results, lenses, folders):
        if lens is not None:
            rel = Path(folder) / "tuned_lens"
            lens.save(tmp / rel)
            res["tuned_lens"]["saved"] = rel.as_posix()
    plot_dynamics(results, tmp)
    plot_lens_kl(results, tmp)
