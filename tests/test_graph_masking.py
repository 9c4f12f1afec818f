"""Correctness by masking: zeroing a unit's slices makes the unit contribute nothing.

For every kind except hidden channels, masked logits must equal the logits of a copy of the
model from which the same unit was *deleted* by hand-written slicing below (written from the
families' module layouts, independently of structlm's adapters).  Hidden channels are checked
by zero-propagation: a masked channel stays exactly zero in the residual stream (removal is not
equivalent because RMSNorm/LayerNorm statistics include the channel; see docs/graph.md).
"""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structlm.graph import build_graph, mask_units
from tiny_models import FAMILIES, model_from_config, tiny_config, tiny_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)
ATOL = 1e-5
P = torch.nn.Parameter


# ---------------------------------------------------------------- hand-written deletion --
def decoder_layers(model, family):
    if family == "gpt2":
        return model.transformer.h
    if family == "opt":
        return model.model.decoder.layers
    return model.model.layers


def attn_of(layer, family):
    return layer.attn if family == "gpt2" else layer.self_attn


def lin_out(mod, idx):
    idx = torch.as_tensor(idx)
    mod.weight = P(mod.weight.detach()[idx].clone())
    if getattr(mod, "bias", None) is not None:
        mod.bias = P(mod.bias.detach()[idx].clone())


def lin_in(mod, idx):
    mod.weight = P(mod.weight.detach()[:, torch.as_tensor(idx)].clone())


def conv_out(mod, idx):  # GPT-2 Conv1D: weight [in, out]
    idx = torch.as_tensor(idx)
    mod.weight = P(mod.weight.detach()[:, idx].clone())
    mod.bias = P(mod.bias.detach()[idx].clone())
    mod.nf = len(idx)


def conv_in(mod, idx):
    mod.weight = P(mod.weight.detach()[torch.as_tensor(idx)].clone())


def numbers(cfg, family):
    if family == "gpt2":
        H = cfg.n_head
        return H, H, cfg.n_embd // H, cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    inter = cfg.ffn_dim if family == "opt" else cfg.intermediate_size
    return H, KV, hd, cfg.hidden_size, inter


def rows(heads, hd, base=0):
    return [base + h * hd + d for h in heads for d in range(hd)]


def delete_heads(model, family, i, q_keep, kv_keep):
    H, KV, hd, D, _ = numbers(model.config, family)
    a = attn_of(decoder_layers(model, family)[i], family)
    qi, ki = rows(q_keep, hd), rows(kv_keep, hd)
    if family == "phi3":
        lin_out(a.qkv_proj, qi + [H * hd + r for r in ki] + [(H + KV) * hd + r for r in ki])
        lin_in(a.o_proj, qi)
        a.config = copy.copy(a.config)
        a.config.num_attention_heads, a.config.num_key_value_heads = len(q_keep), len(kv_keep)
        a.num_key_value_heads = len(kv_keep)
        a.num_key_value_groups = len(q_keep) // len(kv_keep)
    elif family == "gpt2":
        conv_out(a.c_attn, qi + [D + r for r in ki] + [2 * D + r for r in ki])
        conv_in(a.c_proj, qi)
        a.split_size, a.num_heads = len(qi), len(q_keep)
    else:
        lin_out(a.q_proj, qi)
        lin_out(a.k_proj, ki)
        lin_out(a.v_proj, ki)
        lin_in(a.out_proj if family == "opt" else a.o_proj, qi)
        if family == "opt":
            a.num_heads = len(q_keep)
        else:
            a.num_key_value_groups = len(q_keep) // len(kv_keep)


def delete_ffn_channels(model, family, i, drop):
    *_, inter = numbers(model.config, family)
    keep = [c for c in range(inter) if c not in set(drop)]
    layer = decoder_layers(model, family)[i]
    if family == "phi3":
        lin_out(layer.mlp.gate_up_proj, keep + [inter + c for c in keep])
        lin_in(layer.mlp.down_proj, keep)
    elif family == "gpt2":
        conv_out(layer.mlp.c_fc, keep)
        conv_in(layer.mlp.c_proj, keep)
    elif family == "opt":
        lin_out(layer.fc1, keep)
        lin_in(layer.fc2, keep)
    else:
        lin_out(layer.mlp.gate_proj, keep)
        lin_out(layer.mlp.up_proj, keep)
        lin_in(layer.mlp.down_proj, keep)


class Zero(torch.nn.Module):
    """Stands in for a removed sublayer: contributes zeros."""

    def __init__(self, width, tuple_out):
        super().__init__()
        self.width, self.tuple_out = width, tuple_out

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.get("hidden_states")
        z = hidden_states.new_zeros(*hidden_states.shape[:-1], self.width)
        return (z, None) if self.tuple_out else z


def delete_sublayer(model, family, i, kind):
    layer = decoder_layers(model, family)[i]
    D = numbers(model.config, family)[3]
    if kind == "attention":
        if family == "gpt2":
            layer.attn = Zero(D, True)
        else:
            layer.self_attn = Zero(D, True)
    elif family == "opt":
        layer.fc2 = Zero(D, False)
    else:
        layer.mlp = Zero(D, False)


def delete_block(model, family, i):
    layers = decoder_layers(model, family)
    del layers[i]
    cfg = model.config
    if family == "gpt2":
        cfg.n_layer -= 1
    else:
        cfg.num_hidden_layers -= 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:i] + cfg.layer_types[i + 1:]


def delete_embedding_channels(model, drop):
    """OPT with project_in/out: drop word-embedding channels (embed cols, project_in cols,
    project_out rows, lm_head cols)."""
    dec = model.model.decoder
    keep = torch.tensor([c for c in range(dec.embed_tokens.weight.shape[1]) if c not in set(drop)])
    dec.embed_tokens.weight = P(dec.embed_tokens.weight.detach()[:, keep].clone())
    model.lm_head.weight = dec.embed_tokens.weight if model.config.tie_word_embeddings else \
        P(model.lm_head.weight.detach()[:, keep].clone())
    lin_in(dec.project_in, keep)
    lin_out(dec.project_out, keep)


# -------------------------------------------------------------------------- checks --
def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def check_mask_equals_delete(model, family, graph, kind, layer, picks, rng):
    """Mask units ``picks`` of ``kind`` in ``layer``; delete them by hand in a copy; compare."""
    x = tiny_inputs(model.config)
    H, KV, hd, D, inter = numbers(model.config, family)
    masked = copy.deepcopy(model)
    deleted = copy.deepcopy(model)
    if kind == "hidden_channel":  # the OPT word-embedding space (no norms in it): exact
        g = graph.group("hidden_channel", None) if False else [g for g in graph.groups_of(kind) if g.name == "embedding"][0]
        mask_units(masked, [g.unit(c) for c in picks])
        delete_embedding_channels(deleted, picks)
    else:
        g = graph.group(kind, layer)
        mask_units(masked, [g.unit(u) for u in picks])
        if kind == "ffn_channel":
            delete_ffn_channels(deleted, family, layer, picks)
        elif kind == "kv_group":
            kv_keep = [k for k in range(KV) if k not in picks]
            rep = H // KV
            delete_heads(deleted, family, layer, [h for h in range(H) if h // rep in kv_keep], kv_keep)
        elif kind == "query_head":
            rep = H // KV
            if rep == 1:  # MHA: a head's k/v serve only that head, so its removal takes them too
                keep = [h for h in range(H) if h not in picks]
                delete_heads(deleted, family, layer, keep, keep)
            else:
                delete_heads(deleted, family, layer, [h for h in range(H) if h not in picks], list(range(KV)))
        elif kind in ("attention", "ffn"):
            delete_sublayer(deleted, family, layer, kind)
        elif kind == "block":
            delete_block(deleted, family, layer)
        else:
            raise AssertionError(kind)
    ref = logits(model, x)
    got_m, got_d = logits(masked, x), logits(deleted, x)
    assert not torch.allclose(ref, got_m, atol=ATOL), f"masking {kind} {picks} changed nothing (test is vacuous)"
    torch.testing.assert_close(got_m, got_d, atol=ATOL, rtol=0,
                               msg=lambda m: f"{family} {kind} layer {layer} units {picks}: mask != delete\n{m}")


def pick_units(kind, H, KV, n, rng):
    """Units to remove together: query heads come as an equal number per KV group so that stock
    attention code still works after deletion."""
    if kind == "query_head":
        rep = H // KV
        if rep == 1:
            return sorted(rng.sample(range(H), rng.randint(1, max(1, H - 1))))
        d = rng.randint(1, rep - 1)
        return sorted(g * rep + j for g in range(KV) for j in rng.sample(range(rep), d))
    if kind == "kv_group":
        return sorted(rng.sample(range(KV), rng.randint(1, max(1, KV - 1)))) if KV > 1 else [0]
    return sorted(rng.sample(range(n), rng.randint(1, max(1, n // 3))))


def check_hidden_zero(model, family, graph, channels):
    """A masked residual channel is exactly zero after the embeddings, after every layer and
    after the final norm."""
    masked = copy.deepcopy(model)
    mask_units(masked, [graph.group("hidden_channel").unit(c) for c in channels])
    seen = []

    def check(name):
        def hook(mod, args, kwargs, out=None):
            t = out if out is not None else (args[0] if args else kwargs["hidden_states"])
            t = t[0] if isinstance(t, tuple) else t
            seen.append(name)
            assert torch.equal(t[..., channels], torch.zeros_like(t[..., channels])), \
                f"{family}: masked hidden channel(s) {channels} not zero at {name}"
        return hook

    handles = []
    for i, layer in enumerate(decoder_layers(masked, family)):
        handles.append(layer.register_forward_pre_hook(check(f"input of layer {i}"), with_kwargs=True))
        handles.append(layer.register_forward_hook(check(f"output of layer {i}"), with_kwargs=True))
    logits(masked, tiny_inputs(model.config))
    for h in handles:
        h.remove()
    assert len(seen) == 2 * len(decoder_layers(masked, family))
    # the channel is live in the unmasked model
    h0 = model(input_ids=tiny_inputs(model.config), output_hidden_states=True).hidden_states[1]
    assert h0[..., channels].abs().sum() > 0


# --------------------------------------------------------------------------- tests --
LAYER_KINDS = ("query_head", "kv_group", "ffn_channel", "attention", "ffn", "block")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_mask_equals_delete(family, kind):
    rng = random.Random(hash((family, kind)) % 1000)
    model = tiny_model(family)
    graph = build_graph(model)
    H, KV, hd, D, inter = numbers(model.config, family)
    layer = rng.randrange(graph.n_layers)
    n = {"ffn_channel": inter}.get(kind, 1)
    if kind in ("attention", "ffn", "block"):
        picks = [0]
    else:
        picks = pick_units(kind, H, KV, n, rng)
    check_mask_equals_delete(model, family, graph, kind, layer, picks, rng)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_channel_stays_zero(family):
    model = tiny_model(family)
    graph = build_graph(model)
    check_hidden_zero(model, family, graph, [0, 5, graph.hidden - 1])


def test_opt_project_in_out_embedding_channels():
    """OPT-350m layout: post-LN and word_embed_proj_dim != hidden."""
    model = tiny_model("opt", word_embed_proj_dim=32, do_layer_norm_before=False)
    graph = build_graph(model)
    names = [g.name for g in graph.groups_of("hidden_channel")]
    assert names == ["residual", "embedding"]
    check_mask_equals_delete(model, "opt", graph, "hidden_channel", None, [1, 7, 31], random.Random(0))
    check_hidden_zero(model, "opt", graph, [0, 63])
    for kind in ("ffn_channel", "kv_group", "query_head"):
        check_mask_equals_delete(model, "opt", graph, kind, 1, [2, 3], random.Random(0))


# --------------------------------------------------------- property test, random configs --
@st.composite
def random_config(draw):
    family = draw(st.sampled_from(FAMILIES))
    layers = draw(st.integers(1, 3))
    hd = draw(st.sampled_from([4, 8]))
    mha = family in ("gpt2", "opt")
    kv = draw(st.integers(1, 3))
    rep = 1 if mha else draw(st.integers(1, 3))
    H = kv * rep
    inter = draw(st.integers(4, 40))
    tie = draw(st.booleans())
    if family == "gpt2":
        over = dict(n_embd=H * hd, n_head=H, n_layer=layers, n_inner=inter, tie_word_embeddings=tie)
    elif family == "opt":
        emb = draw(st.sampled_from([H * hd, 8]))
        over = dict(hidden_size=H * hd, num_attention_heads=H, num_hidden_layers=layers, ffn_dim=inter,
                    word_embed_proj_dim=emb, enable_bias=draw(st.booleans()), tie_word_embeddings=tie)
    else:
        if family in ("qwen2", "phi3"):
            hidden = H * hd  # head_dim derived from hidden / heads
        else:
            hidden = H * draw(st.sampled_from([4, 8]))  # configs validate hidden % heads == 0
        over = dict(hidden_size=hidden, num_attention_heads=H, num_key_value_heads=kv, intermediate_size=inter,
                    num_hidden_layers=layers, tie_word_embeddings=tie)
        if family not in ("qwen2", "phi3"):
            over["head_dim"] = hd
        if family == "gemma3":
            over["query_pre_attn_scalar"] = hd
    kind = draw(st.sampled_from(LAYER_KINDS + ("hidden_channel",)))
    seed = draw(st.integers(0, 2**16))
    return family, over, kind, seed


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_config())
def test_property_random_units_random_configs(case):
    family, over, kind, seed = case
    rng = random.Random(seed)
    model = model_from_config(tiny_config(family, **over), seed=seed % 7)
    graph = build_graph(model)
    assert graph.total_params == sum(p.numel() for p in model.parameters())
    H, KV, hd, D, inter = numbers(model.config, family)
    if kind == "hidden_channel":
        check_hidden_zero(model, family, graph, sorted(rng.sample(range(D), rng.randint(1, 3))))
        return
    if kind == "query_head" and H // KV == 1 and H == 1 or kind == "kv_group" and KV == 1:
        # removing the only head is checked as the attention sublayer instead
        kind = "attention"
    layer = rng.randrange(graph.n_layers)
    if kind == "block" and graph.n_layers == 1:
        kind = "ffn"
    picks = [0] if kind in ("attention", "ffn", "block") else pick_units(kind, H, KV, inter, rng)
    check_mask_equals_delete(model, family, graph, kind, layer, picks, rng)
