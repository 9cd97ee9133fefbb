"""TransformerLens shim: HookedRootModule moved to the top level in 4.x (2.x keeps it in hook_points)."""
try:  # transformer-lens >= 4
    from transformer_lens import HookedRootModule
except ImportError:  # transformer-lens 2.x / 3.x
    from transformer_lens.hook_points import HookedRootModule
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint

__all__ = ["ActivationCache", "HookedRootModule", "HookPoint"]
