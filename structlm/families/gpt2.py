"""GPT-2: Conv1D weights stored [in, out] (output dim is 1), fused c_attn ([q | k | v] columns),
LayerNorm with bias, learned position embeddings (wpe), tied lm_head, all projections biased."""

from . import register
from .base import FamilyAdapter, Proj


@register
class GPT2Adapter(FamilyAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    layer_prefix = "transformer.h.{i}"
    embed_module = "transformer.wte"
    pos_embed_module = "transformer.wpe"
    final_norm_module = "transformer.ln_f"
    attn_module = "attn"
    attn_norm_modules = ("ln_1",)
    ffn_norm_modules = ("ln_2",)
    norm_kind = "layernorm"
    positions = "learned"
    ffn_kind = "mlp"
    notes = ("Conv1D weights are [in, out]: output features are dim 1.",
             "No RoPE: qk_channel units are single q/k dims; v_channel units are v/o dims.")

    @property
    def hidden(self):
        return int(self.config.n_embd)

    @property
    def n_heads(self):
        return int(self.config.n_head)

    @property
    def n_kv(self):
        return self.n_heads

    @property
    def head_dim(self):
        return self.hidden // self.n_heads

    @property
    def n_layers(self):
        return int(self.config.n_layer)

    @property
    def intermediate(self):
        return int(self.config.n_inner or 4 * self.hidden)

    @property
    def tied(self):
        return bool(getattr(self.config, "tie_word_embeddings", True))

    def layer_window(self, i):
        return None

    def _conv(self, module, offset=0, size=None):
        return Proj(f"{module}.weight", self.opt(f"{module}.bias"), out_dim=1, offset=offset, size=size)

    def q(self, i):
        return self._conv(f"{self.attn(i)}.c_attn", 0, self._attn_width(i))

    def k(self, i):
        return self._conv(f"{self.attn(i)}.c_attn", self._attn_width(i), self._attn_width(i))

    def v(self, i):
        return self._conv(f"{self.attn(i)}.c_attn", 2 * self._attn_width(i), self._attn_width(i))

    def _attn_width(self, i):
        """q, k and v each have heads x head_dim columns (the hidden size while no head is pruned)."""
        return self.layer_heads(i) * self.head_dim

    def o(self, i):
        return self._conv(f"{self.attn(i)}.c_proj", 0, self.hidden)

    def ffn_in(self, i):
        return [self._conv(f"{self.mlp(i)}.c_fc", 0, self.layer_ffn(i))]

    def ffn_out(self, i):
        return self._conv(f"{self.mlp(i)}.c_proj", 0, self.hidden)
