"""Gemma 3 text (Gemma3ForCausalLM, model_type gemma3_text): head_dim != hidden/heads, q/k norms,
four norms per block (input, post_attention, pre_feedforward, post_feedforward), sliding-window
and global layers (``layer_types``), embeddings scaled by sqrt(hidden), RMSNorm scale is 1 + weight."""

from . import register
from .base import FamilyAdapter


@register
class Gemma3Adapter(FamilyAdapter):
    family = "gemma3"
    model_types = ("gemma3_text",)
    qk_norm_modules = ("q_norm", "k_norm")
    attn_norm_modules = ("input_layernorm", "post_attention_layernorm")
    ffn_norm_modules = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    norm_kind = "gemma_rmsnorm"
    output_norms = True
    notes = (
        "Token embeddings are multiplied by sqrt(hidden_size) (a buffer fixed at construction): after "
        "hidden-channel pruning keep the original scale, or the model changes.",
        "RMSNorm multiplies by (1 + weight): zeroing a norm weight does not zero its output; a "
        "masked hidden channel stays zero because its input is zero.",
        "Head dims: v_channel only; qk_channel is refused (q_norm/k_norm normalise over all head dims).",
    )
