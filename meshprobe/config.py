"""ModelConfig: the shape of a vanilla, recursive or MeSH model, validated up front.

Layouts use the paper's notation:
    "24"        a vanilla stack of 24 unshared layers
    "3+6R3+3"   prelude 3 layers, one core of 6 layers looped 3 times, coda 3 layers
    "4+8+8+4"   prelude 4, two UNSHARED middle blocks of 8, coda 4 (block boundaries for vanilla+mesh)

Variants (paper §1.2, §1.3 and Table 4):
    vanilla                   no state passing (only layouts "N" and "P+C+...+Q")
    base                      h(t+1) = f(h(t))
    residual / anchor / anchor_emb and their '+' combinations
                              h(t+1) = f(h(t)) + [h(t)] + [h(0)] + [h_emb]   (anchor_emb is the paper's +anchor*)
    static_comb               h(t+1) = a1 f(h(t)) + a2 h(0) + a3 h_emb, trainable scalars a per step
    dynamic_comb              the same with a = Linear(d, 3)(h(t)) computed per token at every step
    mesh                      memory buffer with per-step write/read routers
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

from meshprobe.checks import check_fits
from meshprobe.errors import UserError

SUPPLEMENT_TERMS = ("residual", "anchor", "anchor_emb")  # canonical order of '+' terms
SPECIAL_VARIANTS = ("vanilla", "base", "static_comb", "dynamic_comb", "mesh")
ROUTER_INITS = ("normal", "zeros")

_LOOPED = re.compile(r"^(\d+)\+(\d+)R(\d+)\+(\d+)$")
_BLOCKS = re.compile(r"^\d+(\+\d+)+$")


def parse_layout(layout: str) -> tuple[int, list[int], int, bool]:
    """Return (prelude, middle block sizes, coda, shared) for a layout string.

    "3+6R3+3" -> (3, [6, 6, 6], 3, True); "4+8+8+4" -> (4, [8, 8], 4, False); "24" -> (0, [24], 0, False).
    """
    text = str(layout).replace(" ", "")
    m = _LOOPED.match(text)
    if m:
        p, c, k, q = (int(g) for g in m.groups())
        check_layout_size(layout, [p, q], c, k)
        if c < 1 or k < 1:
            raise UserError(f"layout {layout!r}: core layers and loop count must be >= 1 (e.g. '3+6R3+3')")
        return p, [c] * k, q, True
    if text.isdigit():
        n = int(text)
        check_layout_size(layout, [n])
        if n < 1:
            raise UserError(f"layout {layout!r}: need at least one layer")
        return 0, [n], 0, False
    if _BLOCKS.match(text):
        parts = [int(x) for x in text.split("+")]
        check_layout_size(layout, parts)
        if len(parts) < 3:
            raise UserError(f"layout {layout!r}: a block layout needs prelude+block+...+coda, e.g. '4+8+8+4'")
        if any(x < 1 for x in parts[1:-1]):
            raise UserError(f"layout {layout!r}: every middle block needs at least one layer")
        return parts[0], parts[1:-1], parts[-1], False
    raise UserError(
        f"layout {layout!r} does not parse: use 'N' (vanilla), 'P+CRK+Q' (looped, e.g. '3+6R3+3') "
        "or 'P+C+C+Q' (unshared blocks, e.g. '4+8+8+4')"
    )


def parse_variant(variant: str) -> tuple[str, frozenset[str]]:
    """Return (kind, supplement terms). kind is one of SPECIAL_VARIANTS or 'sum' for '+' combinations."""
    v = str(variant).strip().lower().replace("anchor*", "anchor_emb")
    if v in SPECIAL_VARIANTS:
        return v, frozenset()
    terms = v.split("+")
    if all(t in SUPPLEMENT_TERMS for t in terms) and len(set(terms)) == len(terms):
        return "sum", frozenset(terms)
    raise UserError(
        f"unknown variant {variant!r}: use one of {', '.join(SPECIAL_VARIANTS)} or a '+' combination of "
        f"{', '.join(SUPPLEMENT_TERMS)} (e.g. 'residual+anchor')"
    )


@dataclass
class ModelConfig:
    """Everything needed to build a model. Derived fields (n_layers, d_head, ...) are properties.

    `mesh_slots` defaults to K + 3 (the paper's B). `scale_embeddings` defaults to True for recursive and
    MeSH models (paper §1.1: h_emb = sqrt(d) Embed(x)) and False for plain vanilla stacks (Pythia does not
    scale). `router_init` is not stated in the paper: "normal" draws router weights like every other linear
    layer (std `init_std`, zero bias, so routing starts near uniform); "zeros" starts exactly uniform.
    """

    d_model: int = 128
    n_heads: int = 4
    vocab_size: int = 8192
    n_ctx: int = 256
    layout: str = "1+2R2+1"
    variant: str = "base"
    mesh_slots: int | None = None
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    router_init: str = "normal"
    scale_embeddings: bool | None = None

    def __post_init__(self) -> None:
        self.layout = str(self.layout).replace(" ", "")
        check_sizes(self)
        kind, terms = parse_variant(self.variant)
        self.variant = canonical_variant(kind, terms)
        prelude, blocks, coda, shared = parse_layout(self.layout)
        for name in ("d_model", "n_heads", "vocab_size", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise UserError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise UserError(f"rotary_pct {self.rotary_pct} gives an odd number of rotary dims ({self.rotary_dims})")
        if self.router_init not in ROUTER_INITS:
            raise UserError(f"router_init must be one of {ROUTER_INITS}, got {self.router_init!r}")
        if kind == "vanilla" and shared:
            raise UserError(
                f"variant 'vanilla' has no shared core: use layout '{self.unrolled_depth}' instead of {self.layout!r}"
            )
        if kind != "vanilla" and not shared and len(blocks) == 1 and prelude == coda == 0:
            raise UserError(
                f"variant {self.variant!r} needs a looped layout like '4+8R2+4' "
                f"(or blocks like '4+8+8+4' for vanilla+mesh), not {self.layout!r}"
            )
        if kind == "mesh":
            if self.mesh_slots is None:
                self.mesh_slots = self.n_loops + 3
            if self.mesh_slots < 2:
                raise UserError(f"mesh needs at least 2 memory slots (mesh_slots >= 2), got {self.mesh_slots}")
        elif self.mesh_slots is not None:
            raise UserError(f"mesh_slots is only for variant 'mesh', not {self.variant!r}: remove it")

    # --- derived shape -------------------------------------------------------------------------------
    @property
    def prelude_layers(self) -> int:
        return parse_layout(self.layout)[0]

    @property
    def block_layers(self) -> list[int]:
        """Layers in each middle block (the core repeated K times when looped)."""
        return parse_layout(self.layout)[1]

    @property
    def coda_layers(self) -> int:
        return parse_layout(self.layout)[2]

    @property
    def shared(self) -> bool:
        """True when one core stack is reused for every loop step (weight-tied)."""
        return parse_layout(self.layout)[3]

    @property
    def is_vanilla(self) -> bool:
        return self.variant == "vanilla"

    @property
    def n_loops(self) -> int:
        """K: loop steps (looped layouts) or middle blocks (block layouts). 0 for a plain vanilla stack."""
        return 0 if self.is_vanilla else len(self.block_layers)

    @property
    def unrolled_depth(self) -> int:
        return self.prelude_layers + sum(self.block_layers) + self.coda_layers

    n_layers = unrolled_depth  # the name TransformerLens's ActivationCache helpers read

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    @property
    def d_vocab(self) -> int:
        return self.vocab_size

    @property
    def rotary_dims(self) -> int:
        return int(self.d_head * self.rotary_pct)

    @property
    def embed_scale(self) -> float:
        scale = (not self.is_vanilla) if self.scale_embeddings is None else self.scale_embeddings
        return math.sqrt(self.d_model) if scale else 1.0

    @property
    def supplement_terms(self) -> frozenset[str]:
        return parse_variant(self.variant)[1]

    @property
    def rotary_dim(self) -> int:  # TransformerLens's name
        return self.rotary_dims

    # TransformerLens reads these off `model.cfg` (ActivationCache.py and patching.py of transformer-lens
    # 4.3.0). Class attributes, not dataclass fields: they are not saved in config.json. `use_attn_result`
    # is a run-time switch (`model.set_use_attn_result`), `device` follows the model (`model.to`).
    normalization_type = "LN"
    positional_embedding_type = "rotary"
    act_fn = "gelu"
    device = None
    attn_only = False  # every layer has an MLP
    parallel_attn_mlp = True  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x)); no resid_mid
    use_attn_result = False
    use_split_qkv_input = False
    use_attn_in = False
    use_hook_mlp_in = False
    n_key_value_heads = None  # no grouped-query attention
    final_rms = False
    original_architecture = "meshprobe"

    # --- test-time depth ------------------------------------------------------------------------------
    PER_STEP_VARIANTS = ("mesh", "static_comb", "dynamic_comb")  # variants with parameters per loop step

    def with_loops(self, loops: int) -> "ModelConfig":
        """The same model run with `loops` loop steps: "P+CRK+Q" -> "P+CR{loops}+Q", everything else (mesh_slots
        included: the routers' width) unchanged. Only looped layouts repeat a core; a variant with parameters per
        step (mesh routers, comb scalars) has them for its trained K only, so it runs at most K steps (the first
        `loops` steps' parameters). Raises UserError naming `loops` otherwise."""
        if not isinstance(loops, int) or isinstance(loops, bool) or loops < 1:
            raise UserError(f"loops= must be an integer >= 1, got {loops!r}")
        if self.is_vanilla or not self.shared:
            raise UserError(f"loops={loops}: a {self.variant} model with layout {self.layout!r} has no looped core "
                            "(only layouts 'P+CRK+Q' run with another loop count)")
        if loops > self.n_loops and self.variant in self.PER_STEP_VARIANTS:
            raise UserError(f"loops={loops}: this {self.variant} model has per-step parameters for its trained "
                            f"{self.n_loops} loop steps only; give loops <= {self.n_loops}")
        return dataclasses.replace(self, layout=f"{self.prelude_layers}+{self.block_layers[0]}R{loops}+{self.coda_layers}")

    # --- serialization -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def canonical_variant(kind: str, terms: frozenset[str]) -> str:
    if kind != "sum":
        return kind
    return "+".join(t for t in SUPPLEMENT_TERMS if t in terms)


# --- size bounds (checked before anything is built) ---------------------------------------------------------
MAX_SIZES = {"d_model": 1 << 16, "n_heads": 1 << 12, "vocab_size": 1 << 21, "n_ctx": 1 << 20, "mesh_slots": 1 << 10}
MAX_LAYERS = 1 << 10  # layers in one part of a layout, and loop steps K
MAX_DEPTH = 1 << 12  # unrolled depth


def check_layout_size(layout: str, parts: list[int], core: int = 0, loops: int = 1) -> None:
    """Refuse a layout whose numbers are absurd before a list of its layers is built."""
    layout = layout if len(str(layout)) <= 40 else f"{str(layout)[:40]}..."
    if any(n > MAX_LAYERS for n in [*parts, core, loops]):
        raise UserError(f"layout {layout!r}: at most {MAX_LAYERS} layers per part and {MAX_LAYERS} loop steps")
    if sum(parts) + core * loops > MAX_DEPTH:
        raise UserError(f"layout {layout!r}: unrolled depth {sum(parts) + core * loops} is above {MAX_DEPTH}")


def check_sizes(cfg: "ModelConfig") -> None:
    """Sane upper bounds on the sizes of a config (MAX_SIZES), so absurd values fail before any allocation."""
    for name, limit in MAX_SIZES.items():
        value = getattr(cfg, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise UserError(f"{name} = {value} is above the supported maximum {limit}")


def estimated_parameters(cfg: "ModelConfig") -> int:
    """A lower estimate of the parameter count without building anything: 12 d^2 per stored layer (attention
    4 d^2, MLP 8 d^2; a shared core is stored once) plus embedding and unembedding (2 V d)."""
    prelude, blocks, coda, shared = parse_layout(cfg.layout)
    stored = prelude + (blocks[0] if shared else sum(blocks)) + coda
    return 12 * cfg.d_model ** 2 * stored + 2 * cfg.vocab_size * cfg.d_model


def check_memory(cfg: "ModelConfig", bytes_per_param: int, what: str, available: int | None = None) -> None:
    """Refuse a model whose estimated parameters times `bytes_per_param` (plus its rotary tables) exceed
    `available` bytes (default: this machine's memory)."""
    need = estimated_parameters(cfg) * bytes_per_param + 2 * 4 * cfg.n_ctx * cfg.rotary_dims
    check_fits(need, f"the model ({cfg.layout}, d_model {cfg.d_model}, vocab {cfg.vocab_size}, n_ctx {cfg.n_ctx}) "
                     f"for {what}", available)
