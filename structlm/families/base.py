"""The adapter base class.  Its defaults describe a Llama-style decoder; a family file
overrides only what differs (names, fused tensors, extra norms, numbers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOC_ADDING_A_FAMILY = "docs/adding-a-family.md"


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter in structlm.families."""

    def __init__(self, model_type, supported, extra: str = ""):
        self.model_type = model_type
        self.supported = list(supported)
        msg = (f"unsupported architecture: model_type {model_type!r} has no structlm family adapter. "
               f"Supported model_types: {', '.join(self.supported)}. ")
        if extra:
            msg += extra + " "
        msg += (f"To add one, write structlm/families/<family>.py (one small adapter class) and a tiny "
                f"config in tests/tiny_models.py, as described in {DOC_ADDING_A_FAMILY}.")
        super().__init__(msg)


@dataclass(frozen=True)
class Proj:
    """One linear projection, or one part of a fused one.

    ``out_dim`` is the weight dimension indexed by output features: 0 for ``nn.Linear``
    ([out, in]), 1 for GPT-2's ``Conv1D`` ([in, out]).  ``offset`` is where this projection's
    outputs start inside a fused tensor (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``); ``size`` is its
    number of outputs.  The bias (if any) is sliced with the same offset.
    """

    weight: str
    bias: str | None = None
    out_dim: int = 0
    offset: int = 0
    size: int | None = None

    @property
    def in_dim(self) -> int:
        return 1 - self.out_dim


class FamilyAdapter:
    """Answers narrow questions about one architecture family.

    Instances are built from a transformers config; :meth:`bind` gives them the model's
    parameter names and shapes so that optional parameters (biases, norm biases) are
    found by presence.  Methods taking ``i`` describe decoder layer ``i``.
    """

    family: str = "llama"
    model_types: tuple[str, ...] = ()
    # module paths
    layer_prefix = "model.layers.{i}"
    embed_module = "model.embed_tokens"
    pos_embed_module: str | None = None
    final_norm_module: str | None = "model.norm"
    lm_head_module = "lm_head"
    attn_module = "self_attn"
    mlp_module = "mlp"
    q_module, k_module, v_module, o_module = "q_proj", "k_proj", "v_proj", "o_proj"
    ffn_in_modules: tuple[str, ...] = ("gate_proj", "up_proj")   # SwiGLU: gate, up
    ffn_out_module = "down_proj"
    qk_norm_modules: tuple[str, ...] = ()                         # per-head_dim norms (Qwen3, Gemma3)
    attn_norm_modules: tuple[str, ...] = ("input_layernorm",)     # used only by the attention sublayer
    ffn_norm_modules: tuple[str, ...] = ("post_attention_layernorm",)  # used only by the FFN sublayer
    # sublayer outputs pass through a norm before the residual add (Gemma 3's post norms): the
    # norm rescales them, so only their relative error reaches the residual stream
    output_norms: bool = False
    # facts
    norm_kind = "rmsnorm"          # "rmsnorm" | "layernorm" | "gemma_rmsnorm" (scale is 1 + weight)
    positions = "rope"             # "rope" | "learned"
    ffn_kind = "swiglu"            # "swiglu" (act(gate) * up) | "mlp" (act(fc1))
    notes: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config
        self.params: dict[str, tuple[int, ...]] = {}
        self.layer_counts: dict[int, tuple[int, int, int]] = {}

    # ---- binding -------------------------------------------------------------------------
    def bind(self, shapes: dict[str, tuple[int, ...]], layer_counts=None) -> "FamilyAdapter":
        """Give the adapter the model's parameter shapes and, for a model whose layers differ
        from its config (a shrunk model, a heterogeneous checkpoint), each layer's
        ``(heads, kv_heads, ffn)``; 0 heads or 0 FFN width is a removed sublayer."""
        self.params = dict(shapes)
        self.layer_counts = dict(layer_counts or {})
        return self

    def has(self, name: str | None) -> bool:
        return name is not None and name in self.params

    def opt(self, name: str) -> str | None:
        """``name`` if the model has that parameter, else None (optional biases)."""
        return name if name in self.params else None

    def norm_params(self, module: str) -> list[str]:
        return [n for n in (f"{module}.weight", f"{module}.bias") if n in self.params]

    # ---- numbers -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden // self.n_heads)

    @property
    def intermediate(self) -> int:
        return int(self.config.intermediate_size)

    def layer_heads(self, i: int) -> int:
        """Query heads of layer ``i`` (the config's count unless bound with per-layer counts)."""
        return self.layer_counts[i][0] if i in self.layer_counts else self.n_heads

    def layer_kv(self, i: int) -> int:
        return self.layer_counts[i][1] if i in self.layer_counts else self.n_kv

    def layer_ffn(self, i: int) -> int:
        return self.layer_counts[i][2] if i in self.layer_counts else self.intermediate

    @property
    def vocab(self) -> int:
        return int(self.config.vocab_size)

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (differs from hidden only with project_in/out)."""
        return self.hidden

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def pre_norm(self) -> bool:
        return True

    def layer_window(self, i: int) -> int | None:
        """Sliding-window length of layer ``i``'s attention, None for global attention."""
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if types is not None:
            return window if types[i] == "sliding_attention" else None
        return window

    def layer_kind(self, i: int) -> str:
        return "sliding_attention" if self.layer_window(i) else "full_attention"

    # ---- names ---------------------------------------------------------------------------
    def layer(self, i: int) -> str:
        return self.layer_prefix.format(i=i)

    def _linear(self, module: str, **kw) -> Proj:
        return Proj(f"{module}.weight", self.opt(f"{module}.bias"), **kw)

    def attn(self, i: int) -> str:
        return f"{self.layer(i)}.{self.attn_module}"

    def mlp(self, i: int) -> str:
        return f"{self.layer(i)}.{self.mlp_module}"

    def q(self, i: int) -> Proj:
        return self._linear(f"{self.attn(i)}.{self.q_module}", size=self.layer_heads(i) * self.head_dim)

    def k(self, i: int) -> Proj:
        return self._linear(f"{self.attn(i)}.{self.k_module}", size=self.layer_kv(i) * self.head_dim)

    def v(self, i: int) -> Proj:
        return self._linear(f"{self.attn(i)}.{self.v_module}", size=self.layer_kv(i) * self.head_dim)

    def o(self, i: int) -> Proj:
        return self._linear(f"{self.attn(i)}.{self.o_module}", size=self.hidden)

    def ffn_in(self, i: int) -> list[Proj]:
        return [self._linear(f"{self.mlp(i)}.{m}", size=self.layer_ffn(i)) for m in self.ffn_in_modules]

    def ffn_out(self, i: int) -> Proj:
        return self._linear(f"{self.mlp(i)}.{self.ffn_out_module}", size=self.hidden)

    def qk_norms(self, i: int) -> list[str]:
        return [p for m in self.qk_norm_modules for p in self.norm_params(f"{self.attn(i)}.{m}")]

    def attn_norms(self, i: int) -> list[str]:
        return [p for m in self.attn_norm_modules for p in self.norm_params(f"{self.layer(i)}.{m}")]

    def ffn_norms(self, i: int) -> list[str]:
        return [p for m in self.ffn_norm_modules for p in self.norm_params(f"{self.layer(i)}.{m}")]

    def embeddings(self) -> str:
        return f"{self.embed_module}.weight"

    def position_embeddings(self) -> str | None:
        return f"{self.pos_embed_module}.weight" if self.pos_embed_module else None

    def final_norm(self) -> list[str]:
        return self.norm_params(self.final_norm_module) if self.final_norm_module else []

    def lm_head(self) -> str:
        """The lm_head weight's name (tied or not; when tied it is absent from named_parameters)."""
        return f"{self.lm_head_module}.weight"

    def embed_projections(self) -> tuple[Proj, Proj] | None:
        """(project_in, project_out) between the embedding width and the residual width, if any."""
        return None

    # ---- summary -------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "model_type": getattr(self.config, "model_type", None),
            "layers": self.n_layers,
            "hidden": self.hidden,
            "heads": self.n_heads,
            "kv_heads": self.n_kv,
            "head_dim": self.head_dim,
            "intermediate": self.intermediate,
            "vocab": self.vocab,
            "embed_dim": self.embed_dim,
            "tied": self.tied,
            "norm": self.norm_kind,
            "pre_norm": self.pre_norm,
            "positions": self.positions,
            "ffn": self.ffn_kind,
            "act": getattr(self.config, "hidden_act", None) or getattr(self.config, "hidden_activation", None)
            or getattr(self.config, "activation_function", None),
            "layer_types": [self.layer_kind(i) for i in range(self.n_layers)],
            "sliding_window": max((self.layer_window(i) or 0) for i in range(self.n_layers)) or None,
            # head-dimension units: qk_channel as RoPE pairs / single dims, or None (refused)
            "qk_channel": None if self.qk_channel_refusal else ("rope_pair" if self.positions == "rope" else "dim"),
        } | ({"qk_channel_refusal": self.qk_channel_refusal} if self.qk_channel_refusal else {})

    @property
    def rotary_fraction(self) -> float:
        """The share of each head's dims that RoPE rotates (``partial_rotary_factor``; 1.0 for all)."""
        params = getattr(self.config, "rope_parameters", None) or {}
        values = [params] + [v for v in params.values() if isinstance(v, dict)]
        factors = [float(v["partial_rotary_factor"]) for v in values if v.get("partial_rotary_factor") is not None]
        own = getattr(self.config, "partial_rotary_factor", None)
        return min(factors + ([float(own)] if own is not None else []) + [1.0])

    @property
    def qk_channel_refusal(self) -> str | None:
        """Why ``qk_channel`` units (q/k head dims) cannot be pruned exactly here, or None."""
        if self.qk_norm_modules:
            return (f"qk_channel pruning is not exact on {self.family}: its "
                    f"{'/'.join(self.qk_norm_modules)} normalise each head over all head_dim dims, so removing "
                    f"a dim rescales the others; prune v_channels, heads or KV groups instead")
        if self.positions == "rope" and self.rotary_fraction < 1.0:
            return (f"qk_channel pruning is not supported with partial rotary embeddings "
                    f"(partial_rotary_factor {self.rotary_fraction:g}): rotary pairs and unrotated dims would "
                    f"need two kinds of unit; prune v_channels, heads or KV groups instead")
        return None
