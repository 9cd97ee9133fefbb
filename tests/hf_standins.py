"""Small stand-ins for the remote-code looped LMs (Ouro, Huginn / Raven): the module names and the order of
calls of their published modeling code, nothing else (tiny MLP layers, no attention). Their specs in
meshprobe.hf.spec are tested on these; the released models themselves are not run here."""
from types import SimpleNamespace

import torch
from torch import nn


class Layer(nn.Module):
    """A residual MLP that also mixes each position with the previous one (so positions interact)."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(2 * d, d)

    def forward(self, x, **kwargs):
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return x + torch.tanh(self.fc(torch.cat([x, prev], dim=-1)))


class TupleLayer(Layer):
    """Raven's SandwichBlock returns (x, attn_map) in some releases, x alone in others."""

    def __init__(self, d, as_tuple=True):
        super().__init__(d)
        self.as_tuple = as_tuple

    def forward(self, x, *args, **kwargs):
        x = super().forward(x)
        return (x, None) if self.as_tuple else x


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _LM(nn.Module):
    def get_input_embeddings(self):
        raise NotImplementedError

    def get_output_embeddings(self):
        return self.lm_head


class OuroModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg.hidden_size) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.early_exit_gate = nn.Linear(cfg.hidden_size, 1)
        self.total_ut_steps = cfg.total_ut_steps  # copied at construction, as the published code does

    def forward(self, input_ids, **kwargs):
        h = self.embed_tokens(input_ids)
        states, gates = [], []
        for current_ut in range(self.total_ut_steps):
            for layer in self.layers:
                h = layer(h, current_ut=current_ut)
            h = self.norm(h)
            states.append(h)
            gates.append(self.early_exit_gate(h))
        return h, states, gates


class OuroForCausalLM(_LM):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = OuroModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, use_cache=None, **kwargs):
        h, _, _ = self.model(input_ids)
        return SimpleNamespace(logits=self.lm_head(h))


def ouro_config(**kw):
    return SimpleNamespace(**{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "total_ut_steps": 4,
                              "max_position_embeddings": 64, **kw})


class RavenForCausalLM(_LM):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        d, tup = cfg.n_embd, cfg.tuple_blocks
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, d),
            prelude=nn.ModuleList(TupleLayer(d, tup) for _ in range(cfg.n_layers_in_prelude)),
            adapter=nn.Linear(2 * d, d),
            core_block=nn.ModuleList(TupleLayer(d, tup) for _ in range(cfg.n_layers_in_recurrent_block)),
            coda=nn.ModuleList(TupleLayer(d, tup) for _ in range(cfg.n_layers_in_coda)),
            ln_f=RMSNorm(d),
        ))
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.transformer.wte

    def forward(self, input_ids=None, num_steps=None, use_cache=False, **kwargs):
        e = self.transformer.wte(input_ids)
        for block in self.transformer.prelude:
            e = _first(block(e))
        steps = self.config.mean_recurrence if num_steps is None else int(num_steps)
        x = torch.randn_like(e)  # random initial state
        for _ in range(steps):
            x = self.transformer.adapter(torch.cat([x, e], dim=-1))
            for block in self.transformer.core_block:
                x = _first(block(x))
        x = self.transformer.ln_f(x)
        for block in self.transformer.coda:
            x = _first(block(x))
        x = self.transformer.ln_f(x)
        return SimpleNamespace(logits=self.lm_head(x))


def raven_config(**kw):
    return SimpleNamespace(**{"vocab_size": 50, "n_embd": 16, "n_layers_in_prelude": 1,
                              "n_layers_in_recurrent_block": 4, "n_layers_in_coda": 2, "mean_recurrence": 6,
                              "block_size": 64, "tuple_blocks": True, **kw})


def _first(out):
    return out[0] if isinstance(out, tuple) else out


REMOTE_CONFIG = '''from transformers import PretrainedConfig


class OuroConfig(PretrainedConfig):
    model_type = "ouro"

    def __init__(self, vocab_size=50, hidden_size=16, num_hidden_layers=2, total_ut_steps=4,
                 max_position_embeddings=64, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.total_ut_steps, self.max_position_embeddings = total_ut_steps, max_position_embeddings
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
'''

REMOTE_MODEL = '''
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ouro import OuroConfig


class OuroForCausalLM(PreTrainedModel):
    config_class = OuroConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, use_cache=None, **kwargs):
        h, _, _ = self.model(input_ids)
        return CausalLMOutputWithPast(logits=self.lm_head(h))
'''


def write_remote_ouro(folder, mark, seed=0):
    """A model directory with remote code: the Ouro stand-in as modeling_ouro.py (which leaves `mark` when
    imported), its config class, auto_map, and safetensors weights."""
    import inspect
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = OuroForCausalLM(ouro_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    src = "\n\n".join(inspect.getsource(c) for c in (Layer, RMSNorm, OuroModel))
    head = f"open({str(mark)!r}, 'w').write('imported')\nimport torch\nfrom torch import nn\n\n"
    (folder / "modeling_ouro.py").write_text(head + src + REMOTE_MODEL)
    (folder / "configuration_ouro.py").write_text(REMOTE_CONFIG)
    config = {"model_type": "ouro", "architectures": ["OuroForCausalLM"], "vocab_size": 50, "hidden_size": 16,
              "num_hidden_layers": 2, "total_ut_steps": 4, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                                                         "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    return model


REMOTE_RAVEN_CONFIG = '''from transformers import PretrainedConfig


class RavenConfig(PretrainedConfig):
    model_type = "huginn_raven"

    def __init__(self, vocab_size=50, n_embd=16, n_layers_in_prelude=1, n_layers_in_recurrent_block=4,
                 n_layers_in_coda=2, mean_recurrence=6, block_size=64, tuple_blocks=True, **kwargs):
        self.vocab_size, self.n_embd, self.block_size, self.tuple_blocks = vocab_size, n_embd, block_size, tuple_blocks
        self.n_layers_in_prelude, self.n_layers_in_coda = n_layers_in_prelude, n_layers_in_coda
        self.n_layers_in_recurrent_block, self.mean_recurrence = n_layers_in_recurrent_block, mean_recurrence
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
'''


def write_remote_raven(folder, dtype=torch.float32, seed=0, **config):
    """A model directory with remote code: the Huginn (Raven) stand-in above as modeling_raven.py (a
    PreTrainedModel with the same modules and forward), its config class, auto_map, and safetensors weights in
    ``dtype``; ``config``: raven_config fields (e.g. the released sizes). Returns the config dict."""
    import inspect
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg = {k: v for k, v in vars(raven_config(**config)).items()}
    src = inspect.getsource(RavenForCausalLM)
    for old, new in (("class RavenForCausalLM(_LM):", "class RavenForCausalLM(PreTrainedModel):\n"
                      "    config_class = RavenConfig\n    base_model_prefix = \"transformer\"\n"),
                     ("super().__init__()", "super().__init__(cfg)"),
                     ("self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)\n",
                      "self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)\n        self.post_init()\n"),
                     ("SimpleNamespace(logits=", "CausalLMOutputWithPast(logits=")):
        assert old in src, old
        src = src.replace(old, new)
    src += ("\n    def get_output_embeddings(self):\n        return self.lm_head\n\n"
            "    def _init_weights(self, module):  # keep torch's default initialisation\n        pass\n")
    head = ("import torch\nfrom torch import nn\nfrom transformers import PreTrainedModel\n"
            "from transformers.modeling_outputs import CausalLMOutputWithPast\n\n"
            "from .configuration_raven import RavenConfig\n\n\n")
    parts = [inspect.getsource(c) for c in (Layer, TupleLayer, RMSNorm)] + [inspect.getsource(_first), src]
    (folder / "modeling_raven.py").write_text(head + "\n\n".join(parts))
    (folder / "configuration_raven.py").write_text(REMOTE_RAVEN_CONFIG)
    torch.manual_seed(seed)
    model = RavenForCausalLM(SimpleNamespace(**cfg)).to(dtype)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    del model
    doc = {"model_type": "huginn_raven", "architectures": ["RavenForCausalLM"], **cfg,
           "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
           "auto_map": {"AutoConfig": "configuration_raven.RavenConfig",
                        "AutoModelForCausalLM": "modeling_raven.RavenForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(doc))
    return doc
