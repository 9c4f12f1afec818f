"""Mistral: Llama layout, GQA, sliding-window attention on every layer (v0.1) or none (v0.3)."""

from . import register
from .base import FamilyAdapter


@register
class MistralAdapter(FamilyAdapter):
    family = "mistral"
    model_types = ("mistral",)
    notes = ("Head dims are not pruned (RoPE).",)
