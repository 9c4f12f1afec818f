"""Tiny random models of every supported family, built in memory (no downloads).

Each entry copies the structural fields of a real checkpoint's config (activation, norm,
biases, RoPE, tying, GQA ratio, sliding window / layer types, OPT pre-LN and projections)
and scales the sizes down (hidden ~64, 2-3 layers, vocab 128).  fp32, eager attention.

    from tiny_models import tiny_config, tiny_model, FAMILIES
"""

from __future__ import annotations

import torch

# family -> (model_type, structural fields copied from the real config, scaled sizes)
TINY: dict[str, tuple[str, str, dict]] = {
    # HuggingFaceTB/SmolLM2-135M: 9 heads / 3 KV heads, head_dim 64, tied, rope_theta 1e5
    "llama": ("llama", "SmolLM2-135M", dict(
        hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8, intermediate_size=192,
        num_hidden_layers=2, vocab_size=128, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, rope_theta=100000.0, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    # mistralai/Mistral-7B-v0.1: 32 heads / 8 KV heads, FFN 3.5x, untied, sliding_window 4096
    "mistral": ("mistral", "Mistral-7B-v0.1", dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8, intermediate_size=224,
        num_hidden_layers=2, vocab_size=128, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=6, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)),
    # Qwen/Qwen2.5-0.5B: 14 heads / 2 KV heads, q/k/v biases, tied, no sliding window in use
    "qwen2": ("qwen2", "Qwen2.5-0.5B", dict(
        hidden_size=112, num_attention_heads=14, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, vocab_size=128, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, use_sliding_window=False, sliding_window=None, max_window_layers=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    # Qwen/Qwen3-0.6B: 16 heads / 8 KV heads, head_dim 128 != hidden/heads, q/k norms, tied
    "qwen3": ("qwen3", "Qwen3-0.6B", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=192,
        num_hidden_layers=2, vocab_size=128, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False, rope_theta=1000000.0, use_sliding_window=False, sliding_window=None,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    # google/gemma-3-270m: 4 heads / 1 KV head (ratio 4), head_dim 256 != 640/4, q/k norms, 4 norms
    # per block, 5 sliding + 1 global layers, sliding_window 512, gelu_pytorch_tanh, tied, scaled embeddings
    "gemma3": ("gemma3_text", "gemma-3-270m", dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        num_hidden_layers=3, vocab_size=128, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        tie_word_embeddings=True, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        max_position_embeddings=64, attn_logit_softcapping=None, final_logit_softcapping=None,
        bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv_proj / gate_up_proj, 32 heads = 32 KV heads, untied,
    # sliding_window 2047
    "phi3": ("phi3", "Phi-3-mini-4k-instruct", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=160,
        num_hidden_layers=2, vocab_size=128, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=8, max_position_embeddings=64, original_max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    # openai-community/gpt2: Conv1D, fused c_attn, learned positions, LayerNorm, gelu_new, tied, n_inner=4h
    "gpt2": ("gpt2", "gpt2", dict(
        n_embd=64, n_head=4, n_layer=2, n_inner=None, vocab_size=128, n_positions=64,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)),
    # facebook/opt-125m: pre-LN (do_layer_norm_before), biases, relu, learned positions, tied.
    # (opt-350m's post-LN + project_in/out variant is covered by the random-config tests.)
    "opt": ("opt", "opt-125m", dict(
        hidden_size=64, num_attention_heads=4, ffn_dim=256, num_hidden_layers=2, vocab_size=128,
        word_embed_proj_dim=64, do_layer_norm_before=True, activation_function="relu", enable_bias=True,
        max_position_embeddings=64, tie_word_embeddings=True, layer_norm_elementwise_affine=True,
        bos_token_id=2, eos_token_id=2, pad_token_id=1)),
}
FAMILIES = tuple(TINY)


def tiny_config(family: str, **overrides):
    """A tiny transformers config of ``family`` (see TINY), with ``overrides`` applied."""
    from transformers import AutoConfig

    model_type, _, fields = TINY[family]
    kw = dict(fields)
    kw.update(overrides)
    if family == "gemma3" and "num_hidden_layers" in overrides and "layer_types" not in overrides:
        n = kw["num_hidden_layers"]
        kw["layer_types"] = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(n)]
    if family == "qwen2" and "num_hidden_layers" in overrides:
        kw["max_window_layers"] = kw["num_hidden_layers"]
    config = AutoConfig.for_model(model_type, **kw)
    config._attn_implementation = "eager"
    return config


def model_from_config(config, seed: int = 0):
    """Random fp32 eval-mode model with eager attention; norm weights are randomized too so that
    they are not trivially ones/zeros."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases: random but well away from zero
                p.copy_(torch.rand_like(p) * 0.5 + 0.75 if "norm" in name or "ln" in name else torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_model(family: str, seed: int = 0, **overrides):
    return model_from_config(tiny_config(family, **overrides), seed)


def tiny_inputs(config, batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, seq), generator=g)
