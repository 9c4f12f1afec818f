"""Llama (and SmolLM2): q/k/v/o, SwiGLU gate/up/down, RMSNorm, RoPE, optional biases."""

from . import register
from .base import FamilyAdapter


@register
class LlamaAdapter(FamilyAdapter):
    family = "llama"
    model_types = ("llama",)
    notes = ("Head dims are not pruned: RoPE rotates pairs (d, d + head_dim/2) of each head.",)

    def layer_window(self, i):
        return None
