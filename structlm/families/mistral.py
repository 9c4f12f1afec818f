"""Mistral: Llama layout, GQA, sliding-window attention on every layer (v0.1) or none (v0.3)."""

from . import register
from .base import FamilyAdapter


@register
class MistralAdapter(FamilyAdapter):
    family = "mistral"
    model_types = ("mistral",)
    notes = ("Head dims: qk_channel units are RoPE pairs (d, d + head_dim/2); v_channel units are v/o dims.",)
