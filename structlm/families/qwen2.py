"""Qwen2 / Qwen2.5: Llama layout with q/k/v biases (no o_proj bias); sliding window only when
``use_sliding_window`` is set (then on layers >= max_window_layers, as ``layer_types`` says)."""

from . import register
from .base import FamilyAdapter


@register
class Qwen2Adapter(FamilyAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
    notes = ("q/k/v biases are sliced with their rows.", "Head dims: qk_channel units are RoPE pairs (d, d + head_dim/2); v_channel units are v/o dims.")

    def layer_window(self, i):
        if not getattr(self.config, "use_sliding_window", False):
            return None
        return super().layer_window(i)
