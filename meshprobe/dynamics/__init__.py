"""Loop dynamics (`mp.dynamics`): a looped model as a dynamical system h^(t+1) = F_t(h^(t); context).

    step = mp.dynamics.loop_map(model, tokens, t)      # F_t with the context of `tokens` fixed (maps.py)
    s = mp.dynamics.spectrum(step, h)                  # s.sigma [b, k] (top singular values), s.rho [b]
    traj = mp.dynamics.trajectory(model, tokens)       # past the trained K: updates, spectra, cycles, labels
    mp.dynamics.exits(run.logits, run.states)          # Huginn's exit rules, two-hit acceleration, Ouro's gate
    lens = mp.dynamics.fit_tuned_lens(...); lens.save(path); mp.dynamics.load_lens(path, model)

Modules: spectrum (matrix-free Lanczos / Arnoldi), maps (the loop map of meshprobe and transformers models),
trajectory (runs past K, cycle detection, classification), exits (exit rules and their scores), lens (tuned
lens per loop step), analyze (the JSON sections `meshprobe analyze --dynamics --tuned-lens` writes).
"""
from meshprobe.dynamics.exits import THRESHOLDS, exits, settle_steps
from meshprobe.dynamics.lens import TunedLens, fingerprint, fit_tuned_lens, lens_kl, load_lens
from meshprobe.dynamics.maps import loop_map, max_steps
from meshprobe.dynamics.spectrum import Spectrum, spectrum
from meshprobe.dynamics.trajectory import Run, classify, cycles, default_steps, describe, run, trajectory

__all__ = ["THRESHOLDS", "Run", "Spectrum", "TunedLens", "classify", "cycles", "default_steps", "describe", "exits",
           "fingerprint", "fit_tuned_lens", "lens_kl", "load_lens", "loop_map", "max_steps", "run", "settle_steps",
           "spectrum", "trajectory"]
