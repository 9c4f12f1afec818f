"""Graph API, adapters, accounting, acceptance numbers (SmolLM2) and build speed / memory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from structlm.families import UnsupportedArchitectureError, get_adapter, supported_model_types
from structlm.graph import (KINDS, Graph, GraphBuildError, Group, Member, Unit, build_graph, mask_units)
from structlm.graph.golden import golden_path
from tiny_models import FAMILIES, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]


def smollm2_config():
    """SmolLM2-135M's structural config (no download): the shapes the real model has."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5)


# ------------------------------------------------------------------------- adapters --
def test_every_family_has_an_adapter():
    types = supported_model_types()
    for fam in FAMILIES:
        assert tiny_config(fam).model_type in types


def test_unsupported_architecture_error():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_adapter(cfg)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "'bert'" in msg and "llama" in msg and "gpt2" in msg and "docs/adding-a-family.md" in msg
    with pytest.raises(UnsupportedArchitectureError):
        build_graph(cfg)


def test_shape_mismatch_is_a_clear_error():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(5, 72))
    with pytest.raises(GraphBuildError, match=r"up_proj.weight.*expected"):
        build_graph(model)


def test_unknown_parameter_is_a_clear_error():
    model = tiny_model("llama")
    model.model.layers[0].extra_scale = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(GraphBuildError, match="extra_scale"):
        build_graph(model)


# --------------------------------------------------------------- graph per family --
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_of_tiny_model(family):
    model = tiny_model(family)
    g = build_graph(model)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights once
    assert g.total_params == n_params
    assert set(g.config) >= {"layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tied"}
    for i in range(g.n_layers):
        assert g.group("kv_group", i).count == g.n_kv
        assert g.group("query_head", i).count == g.n_heads
        assert g.group("ffn_channel", i).count == g.intermediate
        for kind in ("attention", "ffn", "block"):
            assert g.group(kind, i).count == 1
        # query heads partition the kv groups' q/o slices
        qh, kv = g.group("query_head", i), g.group("kv_group", i)
        q_param = qh.members[0].param
        rep = g.n_heads // g.n_kv
        for h in range(g.n_heads):
            (a, b), = [(s[2], s[3]) for s in qh.unit(h).slices if s[0] == q_param and s[1] == qh.members[0].dim][:1]
            ka, kb = [(s[2], s[3]) for s in kv.unit(h // rep).slices if s[0] == q_param][0]
            assert ka <= a < b <= kb
    assert g.group("hidden_channel").count == g.hidden
    # every parameter slice referenced exists and is within bounds
    params = dict(model.named_parameters())
    for grp in g.groups:
        for m in grp.members:
            assert tuple(params[m.param].shape) == m.shape
            assert m.offset + grp.count * m.width <= m.shape[m.dim]
    # building from the config (meta) gives the same graph
    assert build_graph(model.config).to_json() == g.to_json()


def test_units_and_details():
    g = build_graph(tiny_model("phi3"))
    grp = g.group("ffn_channel", 1)
    u = grp.unit(5)
    assert isinstance(u, Unit) and u.kind == "ffn_channel" and u.layer == 1 and u.index == 5
    assert ("model.layers.1.mlp.gate_up_proj.weight", 0, 5, 6) in u.slices
    assert ("model.layers.1.mlp.gate_up_proj.weight", 0, 165, 166) in u.slices
    assert ("model.layers.1.mlp.down_proj.weight", 1, 5, 6) in u.slices
    text = grp.details(5)
    assert "gate_up_proj.weight" in text and "(320, 64) -> (318, 64)" in text and "(64, 160) -> (64, 159)" in text
    assert "removing unit i" in grp.details()
    assert "ffn_channel #5" in str(u)
    with pytest.raises(IndexError):
        grp.unit(grp.count)
    kv = build_graph(tiny_model("llama")).group("kv_group", 0)
    assert "(72, 72) -> (48, 72)" in kv.details(0)  # q_proj loses 3 heads x 8 rows
    blk = build_graph(tiny_model("gpt2")).group("block", 0)
    assert all(m.whole for m in blk.members) and "removed" in blk.details(0)
    tied = build_graph(tiny_model("gpt2")).group("hidden_channel")
    assert "lm_head.weight is tied" in tied.details(0)


def test_dataclasses_and_lookups():
    g = build_graph(tiny_model("qwen3"))
    assert isinstance(g, Graph) and all(isinstance(x, Group) for x in g.groups)
    assert all(isinstance(m, Member) for x in g.groups for m in x.members)
    # q/k norms over the head dim: no qk_channel units, with the reason in the config
    assert {x.kind for x in g.groups} == set(KINDS) - {"qk_channel"}
    assert g.config["qk_channel"] is None and "q_norm/k_norm" in g.config["qk_channel_refusal"]
    assert {x.kind for x in build_graph(tiny_model("llama")).groups} == set(KINDS)
    assert len(g.groups_of("ffn_channel")) == g.n_layers
    assert g.groups_of("ffn_channel", 1)[0].layer == 1
    assert g.count("query_head") == g.n_heads * g.n_layers
    with pytest.raises(ValueError):
        g.groups_of("neuron")
    # attention-shared parameters: q_norm/k_norm are in the attention sublayer, not in a head
    acc = g.accounting()["layers"][0]
    assert set(acc["attention_shared"]) == {"model.layers.0.self_attn.q_norm.weight",
                                            "model.layers.0.self_attn.k_norm.weight"}
    assert not any("q_norm" in m.param for m in g.group("kv_group", 0).members)


def test_head_dim_units():
    """qk_channel d is the rotary pair (d, d + head_dim/2) of a KV group's k head and each of its q
    heads; v_channel d is one v row with the o_proj column d of each of the group's q heads."""
    g = build_graph(tiny_model("llama"))          # 9 heads / 3 KV heads, head_dim 8
    qk, v = g.channel_group("qk_channel", 1, 2), g.channel_group("v_channel", 1, 2)
    assert (qk.count, v.count) == (4, 8) and len(g.groups_of("qk_channel", 1)) == 3
    rows = sorted((name.rsplit(".", 2)[-2], a) for name, dim, a, b in qk.unit(1).slices)
    assert rows == [("k_proj", 17), ("k_proj", 21)] + [("q_proj", r) for r in (49, 53, 57, 61, 65, 69)]
    cols = sorted((name.rsplit(".", 2)[-2], dim, a) for name, dim, a, b in v.unit(3).slices)
    assert cols == [("o_proj", 1, 51), ("o_proj", 1, 59), ("o_proj", 1, 67), ("v_proj", 0, 19)]
    assert qk.params_per_unit == 2 * (3 + 1) * 72 and v.params_per_unit == 72 + 3 * 72
    assert "qk_channel x3" in g.summary_text() and "rotary pair" in g.summary_text()
    gpt2 = build_graph(tiny_model("gpt2"))          # learned positions: single q/k dims
    assert gpt2.config["qk_channel"] == "dim" and gpt2.channel_group("qk_channel", 0, 0).count == gpt2.head_dim
    partial = build_graph(tiny_config("phi3", partial_rotary_factor=0.5))
    assert not partial.groups_of("qk_channel") and partial.groups_of("v_channel")
    assert "partial rotary" in partial.config["qk_channel_refusal"]


def test_json_round_trip_and_dot():
    g = build_graph(tiny_model("opt", word_embed_proj_dim=32))
    g2 = Graph.from_json(g.to_json())
    assert g2.to_json() == g.to_json()
    assert g2.group("ffn_channel", 0).unit(3) == g.group("ffn_channel", 0).unit(3)
    dot = g.to_dot()
    assert dot.startswith("digraph") and "cluster_1" in dot and "contains" in dot and dot.rstrip().endswith("}")
    text = g.summary_text()
    assert "project_in/out" in text and "total" in text


def test_flops_per_token():
    g = build_graph(smollm2_config())
    D, hd, I, V = 576, 64, 1536, 49152
    assert g.group("ffn_channel", 0).flops_per_token_per_unit == 2 * 3 * D
    assert g.group("query_head", 0).flops_per_token_per_unit == 2 * 2 * D * hd
    assert g.group("kv_group", 0).flops_per_token_per_unit == 2 * (3 * 2 + 2) * D * hd
    # attention scores: QK^T and AV, 2 FLOPs per multiply-add, per position seen
    assert g.group("query_head", 0).attention_flops_per_token(100) == 4 * hd * 100
    hid = g.group("hidden_channel")
    assert hid.flops_per_token_per_unit == 2 * (30 * (9 * hd + 3 * hd + 3 * hd + D + 3 * I) + V)
    gem = build_graph(tiny_config("gemma3"))
    assert gem.group("query_head", 0).window == 4 and gem.group("query_head", 2).window is None
    assert gem.group("query_head", 0).attention_flops_per_token(100) == 4 * 16 * 4


def test_mask_units_accepts_groups_and_zeroes_tied_head():
    model = tiny_model("llama")
    g = build_graph(model)
    n = mask_units(model, g.group("ffn_channel", 0))
    assert n == 3 * g.intermediate
    assert model.model.layers[0].mlp.down_proj.weight.abs().sum() == 0
    mask_units(model, g.group("hidden_channel").unit(7))
    assert model.lm_head.weight[:, 7].abs().sum() == 0  # tied to embed_tokens


# ------------------------------------------------------------------- acceptance --
def test_smollm2_acceptance_counts_and_speed():
    cfg = smollm2_config()
    t0 = time.perf_counter()
    g = build_graph(cfg)
    seconds = time.perf_counter() - t0
    assert seconds < 2.0, f"SmolLM2 graph took {seconds:.2f} s"
    assert g.n_layers == 30 and g.count("block") == 30
    for i in range(30):
        assert g.group("kv_group", i).count == 3
        assert g.group("query_head", i).count == 9
        assert g.group("ffn_channel", i).count == 1536
        assert g.group("attention", i).count == 1 and g.group("ffn", i).count == 1
    assert g.group("hidden_channel").count == 576
    assert g.total_params == 134_515_008
    assert g.to_json() == golden_path("smollm2-135m").read_text()


def test_smollm2_cli_json(tmp_path, monkeypatch, capsys):
    """`structlm graph smollm2-135m --format json` (config from the golden shapes, no download)."""
    from structlm import cli_graph

    monkeypatch.setattr("structlm.models.load_config", lambda name: smollm2_config(), raising=False)
    out = tmp_path / "g.json"
    assert cli_graph.run(argparse.Namespace(model="smollm2-135m", format="json", out=str(out))) == 0
    d = json.loads(out.read_text())
    per_layer = {}
    for grp in d["groups"]:
        kind = grp["kind"] + ("/" + grp["name"] if grp["kind"] in ("qk_channel", "v_channel") else "")
        per_layer.setdefault(grp["layer"], {})[kind] = grp["count"]
    assert per_layer[None] == {"hidden_channel": 576}
    for i in range(30):   # head dims: 32 rotary pairs and 64 v dims per KV group
        assert per_layer[i] == {"kv_group": 3, "query_head": 9, "ffn_channel": 1536, "attention": 1, "ffn": 1,
                                "block": 1, **{f"qk_channel/kv{g}": 32 for g in range(3)},
                                **{f"v_channel/kv{g}": 64 for g in range(3)}}
    assert d["accounting"]["total"] == 134_515_008
    assert cli_graph.run(argparse.Namespace(model="smollm2-135m", format="text", out=None)) == 0
    text = capsys.readouterr().out
    assert "ffn_channel" in text and "134,515,008" in text
    assert "qk_channel x3" in text and "v_channel x3" in text
    assert cli_graph.run(argparse.Namespace(model="smollm2-135m", format="dot", out=None)) == 0
    assert capsys.readouterr().out.startswith("digraph")


def test_cli_register_and_errors(capsys):
    from structlm import cli_graph

    ap = argparse.ArgumentParser(prog="structlm")
    cli_graph.register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["graph", "x", "--format", "dot", "--out", "y"])
    assert args.func is cli_graph.run and args.format == "dot" and args.out == "y"
    assert cli_graph.run(argparse.Namespace(model="/no/such/model", format="text", out=None)) == 2
    assert "structlm graph:" in capsys.readouterr().err


LLAMA70B = """
import resource, time, logging
# the peak RSS a child inherits from a large parent (fork then exec) would count: reset it first
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
logging.getLogger("transformers").setLevel(logging.ERROR)
from transformers import LlamaConfig
from structlm.graph import build_graph
cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  num_hidden_layers=80, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
t = time.perf_counter()
g = build_graph(cfg)
s = time.perf_counter() - t
try:
    peak_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
except OSError:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(s, peak_kib, g.total_params, g.count("ffn_channel"))
"""


def test_llama2_70b_shaped_config_on_meta_is_fast_and_small():
    out = subprocess.run([sys.executable, "-c", LLAMA70B], capture_output=True, text=True, timeout=120,
                         cwd=REPO, check=True).stdout.split()
    seconds, rss_kib, total, channels = float(out[0]), int(out[1]), int(out[2]), int(out[3])
    assert total == 68_976_648_192 and channels == 80 * 28672
    assert seconds < 10, f"70B graph took {seconds:.1f} s"
    assert rss_kib < 1024 * 1024, f"70B graph process peaked at {rss_kib / 1024:.0f} MiB"
