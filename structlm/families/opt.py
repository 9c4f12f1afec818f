"""OPT: q/k/v/out_proj and fc1/fc2 with biases, LayerNorm, learned positions (offset 2), pre-LN
(``do_layer_norm_before``; OPT-350m is post-LN), and project_in/out when word_embed_proj_dim differs
from hidden_size (OPT-350m): token embeddings and lm_head then live in a narrower space."""

from . import register
from .base import FamilyAdapter, Proj


@register
class OPTAdapter(FamilyAdapter):
    family = "opt"
    model_types = ("opt",)
    layer_prefix = "model.decoder.layers.{i}"
    embed_module = "model.decoder.embed_tokens"
    pos_embed_module = "model.decoder.embed_positions"
    final_norm_module = "model.decoder.final_layer_norm"
    o_module = "out_proj"
    mlp_module = ""
    ffn_in_modules = ("fc1",)
    ffn_out_module = "fc2"
    attn_norm_modules = ("self_attn_layer_norm",)
    ffn_norm_modules = ("final_layer_norm",)
    norm_kind = "layernorm"
    positions = "learned"
    ffn_kind = "mlp"
    notes = ("With do_layer_norm_before=False (post-LN, OPT-350m) a zeroed sublayer is not an identity: "
             "its LayerNorm still normalizes the residual stream.",
             "No RoPE: qk_channel units are single q/k dims; v_channel units are v/o dims.")

    def mlp(self, i):
        return self.layer(i)

    @property
    def intermediate(self):
        return int(self.config.ffn_dim)

    @property
    def embed_dim(self):
        return int(getattr(self.config, "word_embed_proj_dim", None) or self.hidden)

    @property
    def tied(self):
        return bool(getattr(self.config, "tie_word_embeddings", True))

    @property
    def pre_norm(self):
        return bool(getattr(self.config, "do_layer_norm_before", True))

    def layer_window(self, i):
        return None

    def embed_projections(self):
        if self.embed_dim == self.hidden:
            return None
        return (Proj("model.decoder.project_in.weight", size=self.hidden),
                Proj("model.decoder.project_out.weight", size=self.embed_dim))
