"""Llama (and SmolLM2): q/k/v/o, SwiGLU gate/up/down, RMSNorm, RoPE, optional biases."""

from . import register
from .base import FamilyAdapter


@register
class LlamaAdapter(FamilyAdapter):
    family = "llama"
    model_types = ("llama",)
    notes = ("Head dims: qk_channel units are RoPE pairs (d, d + head_dim/2) of a KV group's heads; v_channel units are v/o dims.",)

    def layer_window(self, i):
        return None
