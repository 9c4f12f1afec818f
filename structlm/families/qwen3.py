"""Qwen3 (dense): Llama layout, head_dim may differ from hidden/heads, RMSNorm on q and k per head
(q_norm/k_norm, shape [head_dim], shared by all heads: attention-shared parameters)."""

from . import register
from .base import FamilyAdapter


@register
class Qwen3Adapter(FamilyAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    qk_norm_modules = ("q_norm", "k_norm")
    notes = ("q_norm/k_norm act on head_dim and are shared by all heads: they go with the attention "
             "sublayer, not with a head.", "Head dims: v_channel only; qk_channel is refused (q_norm/k_norm normalise over all head dims).")

    def layer_window(self, i):
        if not getattr(self.config, "use_sliding_window", False):
            return None
        return super().layer_window(i)
