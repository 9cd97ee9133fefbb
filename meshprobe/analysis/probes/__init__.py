"""Linear probes on cached states: multinomial logistic regression with CV-chosen L2 (`softmax`), streamed ridge
retrieval onto a token code (`retrieval`), token-information probes (`tokens`), the loop-step probe (`loops`),
and `suite`, which runs every probe of one model over the analysis pipeline's cached states.

The functions a notebook calls are importable from here (``mp.probes.token_probe``, ...); they load on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "token_probe": "tokens", "token_probe_increment": "tokens", "TokenProbePlan": "tokens",
    "DEFAULT_OFFSETS": "tokens",
    "loop_step_probe": "loops", "LoopStepAccumulator": "loops",
    "fit_softmax_cv": "softmax", "fit_softmax_many": "softmax",
    "RidgeStats": "retrieval", "retrieval_ranks": "retrieval",
    "ProbeSuite": "suite", "random_init_baseline": "suite",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
