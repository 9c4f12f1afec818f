"""Width methods (magnitude, wanda_sp, flap, llm_pruner): scores on hand-computable cases,
allocation, FLAP's bias compensation, the model left unchanged, save/reload of every output."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from structlm import export, methods, surgery
from structlm.graph import build_graph
from structlm.methods import _width
from structlm.methods._width import WidthError, aggregate, allocate, member_vector, parse_layers
from structlm.methods.flap import compensation
from structlm.methods.llm_pruner import lm_loss_backward, taylor_scores
from structlm.methods.magnitude import magnitude_scores
from structlm.pipeline import make_plan
from structlm.plan import LayerPlan, PlanError, PrunePlan
from structlm.targets import Target
from tiny_models import FAMILIES, tiny_config, tiny_inputs, tiny_model

WIDTH_METHODS = ("magnitude", "wanda_sp", "flap", "llm_pruner")


def calib_for(model, n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, length), generator=g)


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, (value, rg, grad) in before.items():
        assert torch.equal(after[n].detach(), value), n
        assert after[n].requires_grad == rg and after[n].grad is grad, n
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
    assert not model.training


# ---- building blocks, by hand ----------------------------------------------------------------

def test_parse_layers():
    assert parse_layers(None, 6) == list(range(6))
    assert parse_layers("4:-2", 30) == list(range(4, 28))
    assert parse_layers("1,3", 6) == [1, 3]
    with pytest.raises(WidthError, match="out of range"):
        parse_layers([7], 6)


def rows_of(width):
    from structlm.graph.model import Member
    return Member("k.weight", 0, 0, width, (2 * width, 1))


def test_member_vector_element_wise_and_vector_wise():
    from structlm.graph.model import Member

    w = torch.tensor([[1.0, -1.0], [2.0, 2.0], [0.5, 0.5], [3.0, 0.0]])
    g = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 2.0], [1.0, 1.0]])
    rows = Member("x.weight", 0, 0, 2, (4, 2))  # units of 2 rows: rows 0-1 and rows 2-3
    salience = w * g                          # [[1, -1], [2, -2], [1, 1], [3, 0]]
    assert member_vector(salience.abs(), rows, 2).tolist() == [6.0, 5.0]          # sum |w g|
    assert member_vector(salience, rows, 2, vectorize=True).tolist() == [0.0, 5.0]  # sum_rows |sum_row w g|
    cols = Member("x.weight", 1, 0, 1, (4, 2))
    assert member_vector(salience.abs(), cols, 2).tolist() == [7.0, 4.0]

    # fold: a member 3x wider than fold_width over 2 units (6 indices) sums index runs of 2 * 1:
    # per-index scores [6, 5, 4, 3, 2, 1] -> view(3, 2).sum(0) = [12, 9] -> unit i takes index i
    wide = Member("q.weight", 0, 0, 3, (6, 1))
    per = torch.tensor([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    assert member_vector(per, wide, 2).tolist() == [15.0, 6.0]                  # grouped: rows 0-2, 3-5
    assert member_vector(per, wide, 2, fold_width=1).tolist() == [12.0, 9.0]    # rows 0,2,4 / 1,3,5
    assert member_vector(per, rows_of(1), 2, fold_width=1).tolist() == [6.0, 5.0]  # not wider: unchanged


def test_aggregations():
    m = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 1.0]], dtype=torch.float64)
    assert aggregate(m, "sum").tolist() == [5.0, 2.5, 4.0]
    assert aggregate(m, "mean").tolist() == [2.5, 1.25, 2.0]
    assert aggregate(m, "max").tolist() == [4.0, 2.0, 3.0]
    assert aggregate(m, "prod").tolist() == [4.0, 1.0, 3.0]
    assert aggregate(m, "last").tolist() == [4.0, 0.5, 1.0]
    with pytest.raises(WidthError):
        aggregate(m, "median")


def test_magnitude_ffn_channels_by_hand():
    model = tiny_model("llama")
    graph = build_graph(model)
    mlp = model.model.layers[0].mlp
    hidden, inter = graph.hidden, graph.intermediate
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.arange(1.0, inter + 1).unsqueeze(1).expand(inter, hidden))  # row c = c + 1
        mlp.up_proj.weight.zero_()
        mlp.down_proj.weight.fill_(-2.0)
    l1 = magnitude_scores(model, graph, [0], p=1)[("ffn_channel", 0)]
    l2 = magnitude_scores(model, graph, [0], p=2)[("ffn_channel", 0)]
    c = torch.arange(1.0, inter + 1, dtype=torch.float64)
    torch.testing.assert_close(l1, c * hidden + 2.0 * hidden)
    torch.testing.assert_close(l2, torch.sqrt(c ** 2 * hidden + 4.0 * hidden))


def test_magnitude_kv_group_covers_its_query_heads_k_v_and_o_columns():
    model = tiny_model("llama")
    graph = build_graph(model)
    att = model.model.layers[1].self_attn
    hd, rep = graph.head_dim, graph.n_heads // graph.n_kv
    s = magnitude_scores(model, graph, [1], p=2)[("kv_group", 1)]
    for g in range(graph.n_kv):
        q = att.q_proj.weight[g * rep * hd:(g + 1) * rep * hd]
        k = att.k_proj.weight[g * hd:(g + 1) * hd]
        v = att.v_proj.weight[g * hd:(g + 1) * hd]
        o = att.o_proj.weight[:, g * rep * hd:(g + 1) * rep * hd]
        expect = math.sqrt(sum(float(t.detach().double().square().sum()) for t in (q, k, v, o)))
        assert s[g].item() == pytest.approx(expect, rel=1e-6)


def test_wanda_sp_is_weight_times_input_norm():
    model = tiny_model("llama")
    graph = build_graph(model)
    calib = calib_for(model)
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib)
    h.remove()
    x_norm = torch.cat(seen).double().norm(dim=0)
    plan, info = methods.get("wanda_sp")(model, graph, "params=0.8", calib, layers=[0])
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    expect = x_norm * w.abs().sum(0)  # channel c: ||X_c|| * sum_i |W[i, c]|
    from structlm.methods.wanda_sp import InputStats, wanda_elements
    stats = InputStats(model, ["model.layers.0.mlp.down_proj"]).collect(calib)
    elem = wanda_elements(model, stats)("model.layers.0.mlp.down_proj.weight")
    torch.testing.assert_close(elem.double().sum(0), expect, rtol=1e-5, atol=1e-6)
    kept = plan.kept_ffn(graph, 0)
    removed = sorted(set(range(graph.intermediate)) - set(kept))
    assert expect[removed].max() <= expect[kept].min() + 1e-9  # the lowest-scored channels go


def test_taylor_matches_direct_autograd():
    """param_first / vectorize / param_second from the formulas with plain autograd."""
    model = tiny_model("llama")
    graph = build_graph(model)
    calib = calib_for(model, n=3)
    model.zero_grad(set_to_none=True)
    model(calib, labels=calib).loss.backward()  # batch mean loss = mean of per-sample losses
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for s in range(3):
        model.zero_grad(set_to_none=True)
        model(calib[s:s + 1], labels=calib[s:s + 1]).loss.backward()
        for n, p in model.named_parameters():
            fisher[n] += p.grad.square() / 3
    model.zero_grad(set_to_none=True)
    mlp = "model.layers.1.mlp."
    w = {k: dict(model.named_parameters())[mlp + k + ".weight"].detach() for k in ("gate_proj", "up_proj", "down_proj")}
    g = {k: grads[mlp + k + ".weight"] for k in w}
    f = {k: fisher[mlp + k + ".weight"] for k in w}
    first = (w["gate_proj"] * g["gate_proj"]).abs().sum(1) + (w["up_proj"] * g["up_proj"]).abs().sum(1) \
        + (w["down_proj"] * g["down_proj"]).abs().sum(0)
    vector = (w["gate_proj"] * g["gate_proj"]).sum(1).abs() + (w["up_proj"] * g["up_proj"]).sum(1).abs() \
        + (w["down_proj"] * g["down_proj"]).sum(0).abs()
    second = (w["gate_proj"] ** 2 * f["gate_proj"]).sum(1) + (w["up_proj"] ** 2 * f["up_proj"]).sum(1) \
        + (w["down_proj"] ** 2 * f["down_proj"]).sum(0)
    last = (w["down_proj"] * g["down_proj"]).abs().sum(0)
    for taylor, how, expect in (("param_first", "sum", first), ("vectorize", "sum", vector),
                                ("param_second", "sum", second), ("param_first", "last", last)):
        with _width.model_state_guard(model) as handles:
            scores, _ = taylor_scores(model, graph, calib, [0, 1], taylor=taylor, aggregate=how, handles=handles)
        torch.testing.assert_close(scores[("ffn_channel", 1)], expect.double(), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())



@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_taylor_kv_group_scores_follow_the_official_code(family):
    """kv_fold="official" is LLM-Pruner's TaylorImportance on a GQA KV group, written out here from
    its code: per-channel sum |w g| of k/v rows (n_kv * hd), q rows and o columns (n_heads * hd),
    the longer ones folded with view(n_rep, n_kv * hd).sum(0), then consecutive head_dim channels
    summed per group (MetaPruner's consecutive_groups).  kv_fold="grouped" sums each group's own
    query heads."""
    model = tiny_model(family)
    graph = build_graph(model)
    calib = calib_for(model, n=3)
    model.zero_grad(set_to_none=True)
    model(calib, labels=calib).loss.backward()
    named = dict(model.named_parameters())
    attn = "model.layers.1.self_attn."
    sal = {k: (named[attn + k + ".weight"].detach() * named[attn + k + ".weight"].grad).abs()
           for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    model.zero_grad(set_to_none=True)
    hd, n_kv, n_rep = graph.head_dim, graph.n_kv, graph.n_heads // graph.n_kv
    assert n_rep > 1 and n_kv > 1
    per_channel = [sal["k_proj"].sum(1), sal["v_proj"].sum(1), sal["q_proj"].sum(1), sal["o_proj"].sum(0)]
    folded = sum(v.view(-1, n_kv * hd).sum(0) for v in per_channel)       # the official alignment
    official = folded.view(n_kv, hd).sum(1)
    grouped = sum(v.view(n_kv, -1).sum(1) for v in per_channel)           # each group's own heads
    assert not torch.allclose(official, grouped)
    for fold, expect in (("official", official), ("grouped", grouped)):
        with _width.model_state_guard(model) as handles:
            scores, _ = taylor_scores(model, graph, calib, [0, 1], kv_fold=fold, handles=handles)
        torch.testing.assert_close(scores[("kv_group", 1)], expect.double(), rtol=1e-4, atol=1e-9)
    plan, info = methods.get("llm_pruner")(model, graph, "params=0.7", calib, layers=[0, 1])
    assert info["kv_fold"] == "official"
    with pytest.raises(_width.WidthError, match="kv_fold"):
        methods.get("llm_pruner")(model, graph, "params=0.7", calib, layers=[0, 1], kv_fold="strided")

def test_taylor_without_checkpointing_gives_the_same_scores():
    model = tiny_model("qwen2")
    graph = build_graph(model)
    calib = calib_for(model, n=2)
    out = []
    for ckpt in (True, False):
        with _width.model_state_guard(model) as handles:
            out.append(taylor_scores(model, graph, calib, [0, 1], checkpoint=ckpt, handles=handles)[0])
    for key in out[0]:
        torch.testing.assert_close(out[0][key], out[1][key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_the_model_loss(family):
    model = tiny_model(family)
    ids = calib_for(model, n=2, length=11)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss.item()
    with _width.model_state_guard(model):
        loss = lm_loss_backward(model, ids, chunk=3)
    assert loss == pytest.approx(ref, rel=1e-5)


# ---- FLAP ----------------------------------------------------------------------------------------

def test_flap_compensation_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mean = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert compensation(w, 1, mean, [1]).tolist() == [-2.0, -4.0]
    assert compensation(w.T, 0, mean, [1]).tolist() == [-2.0, -4.0]  # Conv1D layout [in, out]
    assert compensation(w, 1, mean, []).tolist() == [0.0, 0.0]


def test_flap_bias_keeps_the_mean_output_of_pruned_projections():
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    calib = calib_for(model, n=6, length=16)
    plan, info = methods.get("flap")(model, graph, "params=0.7", calib, allocation="uniform")
    assert info["bias_compensation"] is True and plan.updates
    names = ["model.layers.%d.self_attn.o_proj" % i for i in range(3)] + ["model.layers.%d.mlp.down_proj" % i for i in range(3)]
    inputs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    checked = 0
    for n in names:
        bias = plan.updates.get(n + ".bias")
        if bias is None:
            continue
        x = torch.cat(inputs[n]).double()
        w = model.get_submodule(n).weight.detach().double()
        i = int(n.split(".")[2])
        if "o_proj" in n:
            kept = [h * graph.head_dim + d for h in plan.kept_heads(graph, i) for d in range(graph.head_dim)]
        else:
            kept = plan.kept_ffn(graph, i)
        dense = (x @ w.T).mean(0)
        pruned = (x[:, kept] @ w[:, kept].T + bias.double()).mean(0)
        torch.testing.assert_close(pruned, dense, atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 3


def test_flap_pruned_tiny_llama_saves_and_reloads_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    for allocation in ("uniform", "global"):
        model = tiny_model("llama", num_hidden_layers=3)
        graph = build_graph(model)
        calib = calib_for(model, n=4, length=16)
        plan, _ = methods.get("flap")(model, graph, "params=0.75", calib, allocation=allocation, align=1)
        assert plan.updates
        ids = tiny_inputs(model.config)
        masked = surgery.mask(copy.deepcopy(model), plan, graph)
        surgery.shrink(model, plan, graph)
        with torch.no_grad():
            ref = model(ids).logits
            torch.testing.assert_close(masked(ids).logits, ref, atol=1e-5, rtol=0)
        assert model.config.attention_bias and model.config.mlp_bias
        out = export.save(model, None, tmp_path / allocation, plan=plan)
        again = PrunePlan.load(out / "plan.json")
        assert (out / "updates.safetensors").is_file() and set(again.updates) == set(plan.updates)
        assert all(torch.equal(again.updates[n], plan.updates[n]) for n in plan.updates)
        reloaded = [export.load(out)]
        if allocation == "uniform":
            reloaded.append(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
        for loaded in reloaded:
            with torch.no_grad():
                torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)


def test_plan_updates_files_legacy_biases_and_validation(tmp_path):
    import json

    from structlm.plan import LayerPlan
    model = tiny_model("llama")
    graph = build_graph(model)
    name = "model.layers.0.mlp.down_proj.bias"
    plan = PrunePlan(updates={name: torch.full((graph.hidden,), 0.5)}, family="llama")
    plan.save(tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["updates"]["file"] == "updates.safetensors"
    again = PrunePlan.load(tmp_path / "plan.json")
    assert torch.equal(again.updates[name], plan.updates[name]) and again.validate(graph)
    assert "updates" not in PrunePlan().to_dict()  # plans without updates keep their old JSON
    legacy = PrunePlan.from_dict({"format": "structlm-plan/1", "biases": {name: [0.5] * graph.hidden}})
    assert torch.equal(legacy.updates[name], plan.updates[name])       # format-1 FLAP plans still load
    (tmp_path / "updates.safetensors").unlink()
    with pytest.raises(PlanError, match="missing"):
        PrunePlan.load(tmp_path / "plan.json")
    (tmp_path / "updates.safetensors").write_bytes(b"garbage")
    with pytest.raises(PlanError, match="damaged"):
        PrunePlan.load(tmp_path / "plan.json")
    down_w = "model.layers.0.mlp.down_proj.weight"
    ffn_plan = {0: LayerPlan(ffn_channels=list(range(0, graph.intermediate, 2)))}
    for bad, layers, msg in (
            ({"model.layers.0.mlp.up_proj.bias": torch.zeros(graph.hidden)}, {}, "not a parameter"),
            ({name: torch.zeros(3)}, {}, "kept hidden channels"),
            ({name: torch.zeros(graph.hidden)}, {0: LayerPlan(ffn=False)}, "removed ffn"),
            ({down_w: torch.zeros(graph.hidden, graph.intermediate)}, ffn_plan, "shrunk coordinates"),
            ({down_w: torch.full((graph.hidden, graph.intermediate // 2), float("nan"))}, ffn_plan, "NaN"),
            ({"model.layers.0.mlp.down_proj.weight": torch.zeros(1)}, {0: LayerPlan(ffn=False)}, "removed ffn"),
            ({"no.such.weight": torch.zeros(1)}, {}, "not a parameter")):
        with pytest.raises(PlanError, match=msg):
            PrunePlan(layers=layers, updates=bad).validate(graph)
    with pytest.raises(PlanError, match="cannot express"):
        m = tiny_model("mistral")
        g = build_graph(m)
        surgery.shrink(m, PrunePlan(updates={"model.layers.0.mlp.down_proj.bias": torch.zeros(g.hidden)}), g)


def test_flap_refuses_hidden_and_skips_bias_where_the_family_cannot_hold_it():
    model = tiny_model("mistral")
    graph = build_graph(model)
    calib = calib_for(model)
    with pytest.raises(WidthError, match="hidden"):
        methods.get("flap")(model, graph, "params=0.8", calib, prune_hidden=True)
    plan, info = methods.get("flap")(model, graph, "params=0.8", calib)
    assert not plan.updates and "skipped" in info["bias_compensation"]
    with pytest.raises(WidthError, match="no bias"):
        methods.get("flap")(model, graph, "params=0.8", calib, bias=True)


# ---- allocation ---------------------------------------------------------------------------------

def _scores(graph, layers, low_layer=None, kind="kv_group"):
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in layers:
        scale = 1e-6 if i == low_layer else 1.0
        out[(kind, i)] = (torch.rand(graph.count(kind, i), generator=g) + 0.1) * scale
        out[("ffn_channel", i)] = (torch.rand(graph.intermediate, generator=g) + 0.1) * scale
    return out


@pytest.mark.parametrize("allocation", ["uniform", "global", "schedule"])
def test_allocation_meets_the_target_closely(allocation):
    model = tiny_model("mistral", num_hidden_layers=4)
    graph = build_graph(model)
    layers = [0, 1, 2, 3]
    kw = {"schedule": [0.0, 1.0, 2.0, 1.0]} if allocation == "schedule" else {}
    plan, info = allocate(graph, _scores(graph, layers), "params=0.8", allocation=allocation, layers=layers, **kw)
    cost = plan.cost(graph)["params_ratio"]
    assert 0.75 < cost <= 0.8
    widths = [(r["heads"], r["ffn_channels"]) for r in plan.shapes(graph)]
    assert all(f % 8 == 0 for _, f in widths)
    if allocation == "uniform":
        assert len(set(widths)) == 1
    if allocation == "schedule":
        assert widths[0] == (graph.n_heads, graph.intermediate)  # weight 0: untouched
        assert widths[2][1] <= widths[1][1]


def test_global_allocation_keeps_floors_and_never_empties_a_layer():
    model = tiny_model("mistral", num_hidden_layers=3)
    graph = build_graph(model)
    scores = _scores(graph, [0, 1, 2], low_layer=1)
    plan, _ = allocate(graph, scores, "params=0.6", allocation="global", layers=[0, 1, 2])
    assert plan.layer(1).kv_groups is not None and len(plan.layer(1).kv_groups) == 1
    assert len(plan.kept_ffn(graph, 1)) == 8  # the floor: one aligned block of channels
    plan, _ = allocate(graph, scores, "params=0.6", allocation="global", layers=[0, 1, 2], floor=0.5)
    assert len(plan.kept_ffn(graph, 1)) >= graph.intermediate // 2
    plan, _ = allocate(graph, scores, "params=0.6", allocation="global", layers=[0, 1, 2], remove_sublayers=True)
    assert not plan.layer(1).attention and not plan.layer(1).ffn  # intended sublayer removal
    with pytest.raises(WidthError, match="out of reach"):
        allocate(graph, scores, "params=0.05", allocation="global", layers=[0, 1, 2])


def test_an_unreachable_target_says_how_far_it_can_go_and_what_reaches_further():
    model = tiny_model("gemma3", num_hidden_layers=4, num_key_value_heads=1)  # one KV group, as Gemma-3-270M
    graph = build_graph(model)
    assert graph.n_kv == 1 < graph.n_heads
    scores = _scores(graph, [1, 2])
    with pytest.raises(WidthError) as caught:
        allocate(graph, scores, "params=0.05", allocation="uniform", layers=[1, 2])
    message = str(caught.value)
    deepest = float(message.split("still keeps ")[1].split("%")[0]) / 100
    # the figure is the plan that removes everything the settings allow
    counts = {("ffn_channel", i): graph.intermediate - 8 for i in (1, 2)}
    kept = graph.total_params - sum(n * graph.group(k, i).params_per_unit for (k, i), n in counts.items())
    assert deepest == pytest.approx(kept / graph.total_params, abs=1e-3)
    for fix in ("milder target", "--layers all", "--gqa query_heads", "--prune-hidden"):
        assert fix in message
    assert "floor=0" not in message  # the default floor is already 0
    with pytest.raises(WidthError) as caught:   # where the family or method refuses hidden pruning
        allocate(graph, scores, "params=0.05", layers=[1, 2], hidden_option=False)
    assert "--prune-hidden" not in str(caught.value) and "--gqa query_heads" in str(caught.value)
    # a global ranking fails the same way, and a reachable target goes through
    with pytest.raises(WidthError, match="out of reach with global allocation"):
        allocate(graph, scores, "params=0.05", allocation="global", layers=[1, 2])
    allocate(graph, scores, f"params={math.ceil(deepest * 1000) / 1000 + 0.01}", allocation="uniform", layers=[1, 2])
    # with several KV groups, whole-group removal reaches further than query heads: no such hint
    model = tiny_model("llama")  # 3 KV groups
    graph = build_graph(model)
    with pytest.raises(WidthError) as caught:
        allocate(graph, _scores(graph, [0, 1]), "params=0.05", layers=[0, 1])
    assert "--gqa" not in str(caught.value) and "--prune-hidden" in str(caught.value)


@pytest.mark.parametrize("family,method,offered", [("gemma3", "magnitude", False), ("llama", "magnitude", True),
                                                   ("llama", "flap", False)])
def test_the_out_of_reach_error_offers_prune_hidden_only_where_it_would_be_accepted(family, method, offered):
    model = tiny_model(family)
    with pytest.raises(WidthError, match="out of reach") as caught:
        make_plan(model, method=method, target="params=0.05", calib=calib_for(model))
    assert ("--prune-hidden" in str(caught.value)) == offered


@pytest.mark.parametrize("method", ["llm_pruner", "flap", "wanda_sp"])
def test_an_unreachable_target_fails_before_any_scoring(method, monkeypatch):
    model = tiny_model("gemma3", num_hidden_layers=4, num_key_value_heads=1)
    calib = calib_for(model)
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(WidthError, match="out of reach"):
        make_plan(model, method=method, target="params=0.3", calib=calib)
    monkeypatch.undo()   # a reachable target is scored and planned as before
    plan, _, _ = make_plan(model, method=method, target="params=0.9", calib=calib)
    assert plan.cost(build_graph(model))["params"] <= 0.9 * build_graph(model).total_params


def test_prune_hidden_on_a_family_with_qk_norms_is_refused_before_scoring(monkeypatch):
    model = tiny_model("gemma3")
    wanda_module = importlib.import_module("structlm.methods.wanda_sp")
    monkeypatch.setattr(wanda_module, "projection_modules", lambda *a, **k: pytest.fail("scored before refusing"))
    with pytest.raises(WidthError, match="--prune-hidden: hidden-channel pruning is exact only .* q/k norms"):
        make_plan(model, method="wanda_sp", target="params=0.8", calib=calib_for(model), options={"prune_hidden": True})


# The real checkpoints' widths, as weightless (meta) graphs: SmolLM2-135M (3 KV groups of 64,
# FFN 1536) and Gemma-3-270M (one KV group of 256 shared by 4 heads, FFN 2048).
REAL_WIDTHS = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)),
    "gemma3-270m": ("gemma3", dict(hidden_size=640, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                   intermediate_size=2048, num_hidden_layers=18, vocab_size=262144,
                                   query_pre_attn_scalar=256)),
}


def real_width_graph(name):
    family, widths = REAL_WIDTHS[name]
    return build_graph(tiny_config(family, **widths))


def official_units_kept(channels: int, unit: int, ratio: float) -> int:
    """LLM-Pruner's MetaPruner.prune_local for one root of ``channels`` output channels pruned in
    consecutive groups of ``unit``: n_pruned = C - int(C * (1 - ratio)), n_pruned // unit groups go."""
    return channels // unit - (channels - int(channels * (1 - ratio))) // unit


def test_the_real_graphs_have_the_checkpoints_parameter_counts():
    assert real_width_graph("smollm2-135m").total_params == 134_515_008   # benchmarks/results/width.json
    assert real_width_graph("gemma3-270m").total_params == 268_098_176


@pytest.mark.parametrize("name,gqa", [("smollm2-135m", "kv_groups"), ("smollm2-135m", "query_heads"),
                                      ("gemma3-270m", "kv_groups"), ("gemma3-270m", "query_heads")])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.33, 0.4, 0.52, 0.6, 0.67, 0.75])
def test_per_root_allocation_has_the_official_llm_pruner_counts(name, gqa, ratio):
    graph = real_width_graph(name)
    layers = _width.parse_layers("4:-2", graph.n_layers)
    kind = _width.attention_kind(graph, gqa)
    hd, n_kv, n_heads, inter = graph.head_dim, graph.n_kv, graph.n_heads, graph.intermediate
    # the official counts: k_proj roots in KV groups of head_dim (query heads follow their group),
    # gate_proj roots by channel; query_heads mode: q_proj roots by head, evenly from every group
    per_group = n_heads // n_kv
    if kind == "kv_group":
        groups = official_units_kept(n_kv * hd, hd, ratio)
        heads = groups * per_group
        attention = dict(kv_groups=list(range(groups)))
    else:
        removed = n_heads - official_units_kept(n_heads * hd, hd, ratio)
        heads = n_heads - removed // n_kv * n_kv
        attention = dict(query_heads=[h for h in range(n_heads) if h % per_group < heads // n_kv])
    ffn = official_units_kept(inter, 1, ratio)
    official = PrunePlan(layers={i: LayerPlan(**attention, ffn_channels=list(range(ffn))) for i in layers}, align=1)
    kept = official.cost(graph)["params"]
    plan, info = allocate(graph, _scores(graph, layers, kind=kind), Target("params", (kept + 0.5) / graph.total_params),
                          allocation="per_root", layers=layers, align=1)
    assert plan.cost(graph)["params"] == kept
    shapes = {r["layer"]: r for r in plan.shapes(graph)}
    for i in range(graph.n_layers):
        want = (heads, ffn) if i in layers else (n_heads, inter)
        assert (shapes[i]["heads"], shapes[i]["ffn_channels"]) == want, (i, ratio)
    assert info["allocation"] == "per_root" and info["ratio"] <= ratio


def test_the_official_split_at_ratio_052_and_params_07_on_smollm2():
    # the figures: ratio 0.52 prunes one of the three KV groups and keeps 737 FFN channels
    assert official_units_kept(192, 64, 0.52) == 2 and official_units_kept(1536, 1, 0.52) == 737
    graph = real_width_graph("smollm2-135m")
    layers = list(range(4, 28))
    scores = _scores(graph, layers)
    plan, _ = allocate(graph, scores, "params=0.7", allocation="per_root", layers=layers)   # align 8
    budget = int(0.7 * graph.total_params)
    # two KV groups and the widest 8-aligned FFN that meets the budget with them, in every layer
    widest = next(w for w in range(graph.intermediate, 0, -8)
                  if PrunePlan(layers={i: LayerPlan(kv_groups=[0, 1], ffn_channels=list(range(w))) for i in layers},
                               align=8).cost(graph)["params"] <= budget)
    assert {(r["kv_heads"], r["ffn_channels"]) for r in plan.shapes(graph) if r["layer"] in layers} == {(2, widest)}
    assert widest == 728 and plan.cost(graph)["params"] <= budget
    # structlm's earlier split (allocation=uniform with round): one KV group, FFN refilled to 904
    plan, _ = allocate(graph, scores, "params=0.7", allocation="uniform", attn_rounding="round", layers=layers)
    assert {(r["kv_heads"], r["ffn_channels"]) for r in plan.shapes(graph) if r["layer"] in layers} == {(1, 904)}


def test_uniform_attention_rounding_is_an_option():
    model = tiny_model("llama")  # 3 KV groups: half of them is 1.5 groups
    graph = build_graph(model)
    scores = _scores(graph, [0, 1])
    kept = {}
    for rounding in (None, "round", "floor"):
        plan, info = allocate(graph, scores, "params=0.95", layers=[0, 1], attn_ratio=0.5, attn_rounding=rounding)
        kept[rounding] = {len(plan.layer(i).kv_groups) for i in (0, 1)}
        assert info["attn_rounding"] == (rounding or "floor")
    assert kept == {None: {2}, "round": {1}, "floor": {2}}   # round(1.5) = 2 groups go; floor (default): 1
    with pytest.raises(WidthError, match="attn_rounding applies to allocation=uniform only"):
        allocate(graph, scores, "params=0.8", allocation="per_root", layers=[0, 1], attn_rounding="floor")
    with pytest.raises(WidthError, match="unknown attn_rounding 'ceil'; choose from floor, round"):
        allocate(graph, scores, "params=0.8", layers=[0, 1], attn_rounding="ceil")


def test_llm_pruner_allocates_per_root_by_default_and_uniform_as_an_option():
    model = tiny_model("llama")
    calib = calib_for(model)
    _, info, _ = make_plan(model, method="llm_pruner", target="params=0.8", calib=calib)
    assert info["allocation"] == "per_root"
    _, info, _ = make_plan(model, method="llm_pruner", target="params=0.8", calib=calib,
                           options={"allocation": "uniform", "attn_rounding": "floor"})
    assert (info["allocation"], info["attn_rounding"]) == ("uniform", "floor")


def test_query_heads_mode_removes_heads_evenly_from_every_kv_group():
    model = tiny_model("llama")  # 9 heads in 3 KV groups
    graph = build_graph(model)
    scores = {("query_head", 0): torch.tensor([5, 1, 9, 8, 7, 0.5, 3, 2, 6.0]),
              ("ffn_channel", 0): torch.ones(graph.intermediate)}
    plan, _ = allocate(graph, scores, "params=0.9", layers=[0], attn_ratio=0.34, align=1)
    assert plan.layer(0).query_heads == [0, 2, 3, 4, 6, 8]  # the lowest head of each group goes
    plan.validate(graph)


# ---- every method, every family: plans are valid, the model is unchanged ------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", WIDTH_METHODS)
def test_methods_on_every_family_leave_the_model_unchanged(family, method):
    model = tiny_model(family)
    graph = build_graph(model)
    before = snapshot(model)
    options = {"gqa": "query_heads"} if family in ("llama", "qwen2") else {}
    plan, info, _ = make_plan(model, method=method, target="params=0.8", calib=calib_for(model), graph=graph,
                              options=options)
    assert_unchanged(model, before)
    assert 0.7 < plan.cost(graph)["params_ratio"] <= 0.8
    __import__("json").dumps(info)
    shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)
    assert sum(p.numel() for p in shrunk.parameters()) <= 0.801 * graph.total_params


def test_model_restored_when_scoring_fails(monkeypatch):
    model = tiny_model("llama")
    graph = build_graph(model)
    before = snapshot(model)
    import structlm.methods.llm_pruner as lp

    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)
    real = lp.lm_loss_backward
    monkeypatch.setattr(lp, "lm_loss_backward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        methods.get("llm_pruner")(model, graph, "params=0.8", calib_for(model))
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "llm_pruner"])
def test_hidden_channels_optional(method):
    model = tiny_model("llama")
    graph = build_graph(model)
    calib = calib_for(model)
    plan, _ = methods.get(method)(model, graph, "params=0.8", calib)
    assert plan.hidden_channels is None  # off by default
    plan, info = methods.get(method)(model, graph, "params=0.7", calib, prune_hidden=True)
    assert plan.hidden_channels is not None and len(plan.hidden_channels) % 8 == 0
    assert len(plan.hidden_channels) < graph.hidden and info["hidden_ratio"] > 0
    shrunk = surgery.shrink(copy.deepcopy(model), plan, graph)
    assert shrunk.config.hidden_size == len(plan.hidden_channels)


@pytest.mark.parametrize("method", WIDTH_METHODS)
def test_every_method_output_saves_and_reloads(method, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    graph = build_graph(model)
    plan, _, _ = make_plan(model, method=method, target="params=0.75", calib=calib_for(model), graph=graph)
    surgery.shrink(model, plan, graph)
    ids = tiny_inputs(model.config)
    with torch.no_grad():
        ref = model(ids).logits
    out = export.save(model, None, tmp_path / method, plan=plan)
    with torch.no_grad():
        torch.testing.assert_close(export.load(out)(ids).logits, ref, atol=1e-5, rtol=0)


def test_cli_flags_become_options():
    import argparse

    p = argparse.ArgumentParser()
    _width.add_method_args(p)
    args = p.parse_args(["--prune-hidden", "--gqa", "query_heads", "--allocation", "schedule", "--schedule", "1,2",
                         "--layers", "4:-2", "--taylor", "vectorize"])
    assert _width.method_options(args) == {"prune_hidden": True, "gqa": "query_heads", "allocation": "schedule",
                                           "layers": "4:-2", "taylor": "vectorize", "schedule": [1.0, 2.0]}
    assert _width.method_options(p.parse_args([])) == {}
    args = p.parse_args(["--gqa", "query_heads"])
    args.method, args.align = "sleb", 16
    assert _width.method_options(args) == {}  # other methods get nothing
    args.method = "flap"
    assert _width.method_options(args) == {"gqa": "query_heads", "align": 16}


def test_unknown_options_are_refused():
    model = tiny_model("llama")
    with pytest.raises(WidthError, match="unknown option"):
        methods.get("magnitude")(model, build_graph(model), "params=0.8", None, colour="blue")
    with pytest.raises(WidthError, match="params target"):
        methods.get("magnitude")(model, build_graph(model), "blocks=1", None)
