"""Layer-pruning methods: the layer runner reproduces the stock forward, every score on a
hand-computable case, target accounting, screening/lazy search against the exhaustive one, the
model left unchanged, the removal figure and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from structlm import methods, surgery
from structlm.graph import build_graph
from structlm.methods import _layers
from structlm.methods._layers import LayerRunner, UnsupportedRunnerError, plan_from_removed, target_reached
from structlm.methods.last_blocks import last_block_indices
from structlm.targets import parse_target
from tiny_models import tiny_inputs, tiny_model

RUNNER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
METHODS = ("last_blocks", "shortgpt", "shortgpt_angular", "sleb", "finercut")


def run(method, model, target, calib, **options):
    graph = build_graph(model)
    if method in ("sleb", "finercut"):
        options.setdefault("progress", False)
    with torch.no_grad():
        plan, info = methods.get(method)(model, graph, parse_target(target), calib, **options)
    plan.validate(graph)
    json.dumps(info)
    json.dumps(plan.to_dict())
    return plan, info, graph


def zero_sublayer(model, i, kind):
    """Make layer i's attention (o_proj) or FFN (down_proj) output exactly zero."""
    layer = model.model.layers[i]
    proj = layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def assert_unchanged(model, before):
    params, types = before
    after_params, after_types = state(model)
    assert after_types == types
    assert after_params.keys() == params.keys()
    for k in params:
        assert torch.equal(params[k], after_params[k]), k


def test_registry_names():
    assert set(METHODS) <= set(methods.available())


# ---- the runner -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_runner_reproduces_the_final_hidden_state(family):
    # 12 tokens: longer than the tiny sliding windows (mistral 6, gemma3 4, phi3 8)
    model = tiny_model(family, num_hidden_layers=3)
    ids = tiny_inputs(model.config, batch=2, seq=12)
    runner = LayerRunner(model)
    with torch.no_grad():
        expected = model.model(ids).last_hidden_state
        torch.testing.assert_close(runner.forward_hidden(ids), expected, atol=1e-6, rtol=0)
        logits = model(ids).logits
        torch.testing.assert_close(runner.logits(runner.forward_hidden(ids)), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_runner_skipping_equals_the_shrunk_model(family):
    model = tiny_model(family, num_hidden_layers=3)
    ids = tiny_inputs(model.config, batch=2, seq=12)
    graph = build_graph(model)
    removed = [(0, "ffn"), (1, "attention"), (2, "block")]
    shrunk = surgery.shrink(copy.deepcopy(model), plan_from_removed(graph, removed), graph)
    runner = LayerRunner(model)
    with torch.no_grad():
        got = runner.forward_hidden(ids, removed=_layers.skip_set((0, "ffn")) | _layers.skip_set((1, "attention"))
                                    | _layers.skip_set((2, "block")))
        torch.testing.assert_close(got, shrunk.model(ids).last_hidden_state, atol=1e-5, rtol=0)
        # the cached trace gives the same final state, and a candidate run from its layer too
        trace = _layers.Trace(runner, ids, batch_size=1, removed=_layers.skip_set((0, "ffn")))
        trace.remove((1, "attention"))
        torch.testing.assert_close(torch.cat([trace.run(b, 2, frozenset(_layers.skip_set((2, "block"))))
                                              for b in range(2)]), got, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ("gpt2", "opt"))
def test_unsupported_family_is_a_clear_error(family):
    model = tiny_model(family)
    with pytest.raises(UnsupportedRunnerError, match="does not support family"):
        LayerRunner(model)
    with pytest.raises(UnsupportedRunnerError):
        run("finercut", model, "sublayers=1", tiny_inputs(model.config))


# ---- scores on hand-computable cases ----------------------------------------------------------
def test_shortgpt_identity_block_has_bi_zero_and_goes_first():
    model = tiny_model("llama", num_hidden_layers=4)
    zero_sublayer(model, 2, "attention")
    zero_sublayer(model, 2, "ffn")
    ids = tiny_inputs(model.config, batch=3, seq=10)
    plan, info, _ = run("shortgpt", model, "blocks=1", ids)
    assert info["block_influence"][2] == pytest.approx(0.0, abs=1e-6)
    assert plan.removed_blocks == [2]
    # BI by hand from the stock model's hidden states (inputs/outputs of blocks 0..n-2)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(3):
        bi = 1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item()
        assert info["block_influence"][i] == pytest.approx(bi, abs=1e-5)


def test_shortgpt_angular_zero_sublayer_scores_zero():
    model = tiny_model("llama", num_hidden_layers=3)
    zero_sublayer(model, 1, "ffn")
    ids = tiny_inputs(model.config, batch=2, seq=10)
    plan, info, _ = run("shortgpt_angular", model, "sublayers=1", ids)
    assert info["angular"]["ffn"][1] == pytest.approx(0.0, abs=1e-3)  # arccos near 1 is steep
    assert plan.meta["removal_order"][0] == {"layer": 1, "sublayer": "ffn", "score": info["angular"]["ffn"][1]}
    assert not plan.layer(1).ffn and plan.layer(1).attention


@pytest.mark.parametrize("distance", _layers.DISTANCES)
def test_finercut_zero_sublayer_has_distance_zero(distance):
    model = tiny_model("llama", num_hidden_layers=3)
    zero_sublayer(model, 1, "attention")
    ids = tiny_inputs(model.config, batch=2, seq=10)
    plan, info, _ = run("finercut", model, "sublayers=1", ids, distance=distance, screen_samples=None,
                        lazy=False, positions=None)
    first = info["steps"][0]
    assert (first["layer"], first["sublayer"]) == (1, "attention")
    assert first["score"] == pytest.approx(0.0, abs=1e-3 if distance == "angular" else 1e-6)
    assert min(v for k, v in first["candidate_scores"].items() if k != "1.attention") > 1e-6


def test_scoring_model_copies_to_the_scoring_dtype_and_leaves_the_model_alone():
    model = tiny_model("llama", num_hidden_layers=2)
    assert _layers.scoring_model(model, "model") is model
    assert _layers.scoring_model(model, "float32") is model
    copy_ = _layers.scoring_model(model, "bfloat16")
    assert copy_ is not model and next(copy_.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    auto = _layers.scoring_model(model, "auto")
    expected = torch.bfloat16 if _layers.fast_bf16_available("cpu") else torch.float32
    assert next(auto.parameters()).dtype == expected
    with pytest.raises(ValueError, match="scoring dtype"):
        _layers.scoring_model(model, "int8")


def test_finercut_in_bfloat16_still_finds_a_zero_sublayer_first():
    model = tiny_model("llama", num_hidden_layers=3)
    zero_sublayer(model, 2, "ffn")
    ids = tiny_inputs(model.config, batch=2, seq=10)
    plan, info, _ = run("finercut", model, "sublayers=1", ids, dtype="bfloat16", screen_samples=None)
    assert info["scoring_dtype"] == "bfloat16"
    assert (info["steps"][0]["layer"], info["steps"][0]["sublayer"]) == (2, "ffn")
    assert info["steps"][0]["score"] == 0.0
    assert next(model.parameters()).dtype == torch.float32


def _dense_and_pruned_logits(model, graph, removed, ids):
    pruned = surgery.shrink(copy.deepcopy(model), plan_from_removed(graph, removed), graph)
    with torch.no_grad():
        return model(ids).logits, pruned(ids).logits


@pytest.mark.parametrize("distance", _layers.DISTANCES)
def test_finercut_scores_match_the_formulas(distance):
    model = tiny_model("qwen3", num_hidden_layers=3)
    graph = build_graph(model)
    ids = tiny_inputs(model.config, batch=2, seq=9)
    plan, info, _ = run("finercut", model, "sublayers=2", ids, distance=distance, screen_samples=None, lazy=False,
                        positions=None, batch_size=1, dtype="model")
    first, second = info["steps"][0], info["steps"][1]
    removed0 = [(first["layer"], first["sublayer"])]
    # step 2 scores candidate c on the model without step 1's choice and c
    for key, score in list(second["candidate_scores"].items())[:3]:
        i, kind = key.split(".")
        dense, pruned = _dense_and_pruned_logits(model, graph, removed0 + [(int(i), kind)], ids)
        p, q = F.log_softmax(dense, -1), F.log_softmax(pruned, -1)
        if distance == "js":
            m = torch.log((p.exp() + q.exp()) / 2)
            expected = (0.5 * (p.exp() * (p - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)).mean()
        elif distance == "kl":
            expected = (p.exp() * (p - q)).sum(-1).mean()
        elif distance == "norm":
            expected = torch.linalg.matrix_norm(dense - pruned).mean()
        else:
            with torch.no_grad():
                h0 = model.model(ids).last_hidden_state
                pm = surgery.shrink(copy.deepcopy(model), plan_from_removed(graph, removed0 + [(int(i), kind)]),
                                    graph)
                h1 = pm.model(ids).last_hidden_state
            expected = (torch.arccos(F.cosine_similarity(h0, h1, dim=-1).clamp(-1, 1)) / math.pi).mean()
        assert score == pytest.approx(float(expected), rel=1e-4, abs=1e-6), key


def test_sleb_removes_an_identity_block_first_and_scores_calibration_nll():
    model = tiny_model("llama", num_hidden_layers=4)
    zero_sublayer(model, 1, "attention")
    zero_sublayer(model, 1, "ffn")
    ids = tiny_inputs(model.config, batch=3, seq=10)
    plan, info, _ = run("sleb", model, "blocks=2", ids)
    assert info["removal_order"][0]["layer"] == 1
    with torch.no_grad():
        dense_nll = model(ids, labels=ids).loss.item()  # mean next-token NLL of the unchanged model
    assert info["steps"][0]["score"] == pytest.approx(dense_nll, rel=1e-5)
    assert info["steps"][0]["calib_ppl"] == pytest.approx(math.exp(dense_nll), rel=1e-4)
    assert len(plan.removed_blocks) == 2 and 1 in plan.removed_blocks


def test_last_blocks_picks_the_blocks_before_the_final_one():
    assert last_block_indices(30, 7) == [22, 23, 24, 25, 26, 27, 28]
    model = tiny_model("llama", num_hidden_layers=6)
    plan, info, graph = run("last_blocks", model, "blocks=2", None)
    assert plan.removed_blocks == [3, 4]
    plan, info, graph = run("last_blocks", model, "params=0.7", None)
    k = len(plan.removed_blocks)
    assert plan.removed_blocks == list(range(5 - k, 5))
    assert plan.cost(graph)["params"] <= 0.7 * graph.accounting()["total"]
    fewer = plan_from_removed(graph, [(i, "block") for i in plan.removed_blocks[1:]])
    assert fewer.cost(graph)["params"] > 0.7 * graph.accounting()["total"]  # the smallest k
    with pytest.raises(ValueError, match="cannot be met"):
        run("last_blocks", model, "blocks=6", None)


# ---- targets --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", ("params=0.75", "sublayers=3", "blocks=2"))
def test_targets_are_met_never_short_and_overshoot_by_at_most_one_unit(method, target):
    model = tiny_model("llama", num_hidden_layers=6)
    ids = tiny_inputs(model.config, batch=2, seq=8)
    plan, info, graph = run(method, model, target, ids)
    t = parse_target(target)
    order = [(e["layer"], e["sublayer"]) for e in plan.meta["removal_order"]]
    assert target_reached(graph, t, order, method)
    assert not target_reached(graph, t, order[:-1], method)  # one unit fewer is short
    cost = plan.cost(graph)
    assert plan.meta["params_ratio"] == pytest.approx(cost["params_ratio"], abs=1e-6)
    if t.kind == "params":
        assert cost["params"] <= 0.75 * graph.accounting()["total"]
    if t.kind == "blocks" and method in ("last_blocks", "shortgpt", "sleb"):
        assert len(plan.removed_blocks) == 2
    sublayers = 2 * len(plan.removed_blocks) + sum(
        (not lp.attention) + (not lp.ffn) for i, lp in plan.layers.items() if i not in plan.removed_blocks)
    if t.kind == "sublayers":
        assert sublayers == (3 if method in ("finercut", "shortgpt_angular") else 4)
    if t.kind == "blocks" and method in ("finercut", "shortgpt_angular"):
        assert sublayers == 4


def test_params_target_counts_tied_embeddings_once():
    model = tiny_model("llama", num_hidden_layers=6)  # tied, like SmolLM2
    graph = build_graph(model)
    total = graph.accounting()["total"]
    assert total == sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    plan = plan_from_removed(graph, [(0, "ffn"), (3, "block")])
    layer_acc = graph.accounting()["layers"]
    expected = total - layer_acc[3]["block"] - (graph.group("ffn", 0).params)
    assert plan.cost(graph)["params"] == expected
    assert plan.removed_blocks == [3] and plan.layers[0].ffn is False


def test_impossible_targets_are_errors():
    model = tiny_model("llama", num_hidden_layers=2)
    ids = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="cannot be met"):
        run("shortgpt", model, "params=0.01", ids)


# ---- screening, confirmation and lazy search ---------------------------------------------------
@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_screened_lazy_search_picks_what_the_exhaustive_search_picks(family):
    model = tiny_model(family, num_hidden_layers=5)
    ids = tiny_inputs(model.config, batch=8, seq=16)
    exhaustive, info_ex, _ = run("finercut", model, "sublayers=5", ids, screen_samples=None, lazy=False,
                                 positions=None, batch_size=2, dtype="model")
    fast, info_fast, _ = run("finercut", model, "sublayers=5", ids, screen_samples=4, confirm_top=3, lazy=True,
                             positions=None, batch_size=2, dtype="model")
    order = lambda info: [(e["layer"], e["sublayer"]) for e in info["removal_order"]]
    assert order(info_fast) == order(info_ex)
    # the exhaustive search scores every remaining candidate; the fast one fewer, on fewer samples
    assert [s["evaluated"] for s in info_ex["steps"]] == [10 - k for k in range(5)]
    assert info_fast["cost"]["forwards"] < info_ex["cost"]["forwards"]
    for step in info_fast["steps"]:  # confirmed scores are the exhaustive search's scores
        assert step["score"] == pytest.approx(
            info_ex["steps"][step["step"] - 1]["score"], rel=1e-5, abs=1e-9)


def test_sleb_screened_then_confirmed_on_all_samples_matches_exhaustive():
    # (random tiny models are no test of lazy SLEB: removing a random block can lower the NLL, so
    # scores are not monotone; confirmation of every screened candidate on all samples is exact)
    model = tiny_model("llama", num_hidden_layers=6)
    ids = tiny_inputs(model.config, batch=6, seq=12)
    _, ex, _ = run("sleb", model, "blocks=3", ids)
    _, fast, _ = run("sleb", model, "blocks=3", ids, screen_samples=3, confirm_top=6)
    assert [s["score"] for s in fast["steps"]] == pytest.approx([s["score"] for s in ex["steps"]], rel=1e-6)
    assert [e["layer"] for e in fast["removal_order"]] == [e["layer"] for e in ex["removal_order"]]


# ---- the model is left unchanged --------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_methods_leave_the_model_unchanged(method):
    model = tiny_model("gemma3", num_hidden_layers=3)
    ids = tiny_inputs(model.config)
    before = state(model)
    with torch.no_grad():
        logits = model(ids).logits
    run(method, model, "sublayers=2", ids)
    assert_unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=0, rtol=0)


def test_model_restored_when_scoring_fails(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=3)
    ids = tiny_inputs(model.config)
    before = state(model)
    calls = {"n": 0}
    real = LayerRunner.final

    def failing(self, h):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(self, h)

    monkeypatch.setattr(LayerRunner, "final", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run("finercut", model, "sublayers=2", ids, screen_samples=None, lazy=False)
    assert_unchanged(model, before)

    def failing_layer(self, h, *args, **kwargs):
        raise RuntimeError("inside the layer")

    monkeypatch.setattr(LayerRunner, "final", real)
    runner = LayerRunner(model)
    monkeypatch.setattr(type(model.model.layers[0].mlp), "forward", failing_layer)
    with pytest.raises(RuntimeError, match="inside the layer"):
        runner.layer(0, runner.embed(ids), attention=False)
    assert_unchanged(model, before)


# ---- the figure and the CLI -------------------------------------------------------------------
def test_plot_removed_from_the_plan_alone(tmp_path):
    from structlm.figures import plot_removed, removed_cells
    from structlm.plan import PrunePlan

    model = tiny_model("llama", num_hidden_layers=6)
    ids = tiny_inputs(model.config, batch=2, seq=8)
    plan, info, graph = run("finercut", model, "sublayers=4", ids)
    plan = PrunePlan.from_dict(json.loads(plan.to_json()))  # from its JSON alone
    cells = removed_cells(plan, graph.n_layers)
    assert sorted(r for r in cells.values()) == [1, 2, 3, 4]
    for rank, entry in enumerate(info["removal_order"], start=1):
        assert cells[(entry["layer"], entry["sublayer"])] == rank
    path = plot_removed(plan, graph, tmp_path / "removed.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blocks, _, graph = run("shortgpt", model, "blocks=2", ids)
    cells = removed_cells(blocks, graph.n_layers)
    assert len(cells) == 4 and all(r in (1, 2) for r in cells.values())
    plot_removed(blocks, graph, tmp_path / "blocks.png")


def test_cli_prune_finercut_writes_the_figure_and_the_order(tmp_path):
    from structlm import cli
    from helpers import SAMPLE_TEXT, tiny_llama, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_llama(layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 4)
    out = tmp_path / "out"
    common = ["--calib-data", str(text), "--calib-samples", "4", "--calib-len", "16", "--no-eval", "--threads", "1"]
    rc = cli.main(["prune", str(folder), "--method", "finercut", "--target", "sublayers=3", "--out", str(out),
                   "-O", "distance=kl", "-O", "screen_samples=2", *common])
    assert rc == 0
    assert json.loads((out / "recipe.json").read_text())["options"] == {"distance": "kl", "screen_samples": 2}
    assert json.loads((out / "report.json").read_text())["method_info"]["distance"] == "kl"
    # an option the method does not take: one clear error naming it and the ones it takes, nothing written
    bad = tmp_path / "bad"
    assert cli.main(["prune", str(folder), "--method", "finercut", "--target", "sublayers=3", "--out", str(bad),
                     "-O", "screen_sample=2", *common]) != 0
    assert not bad.exists()
    assert (out / "removed.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    order = report["method_info"]["removal_order"]
    assert len(order) == 3 and all({"layer", "sublayer", "score"} <= set(e) for e in order)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["removal_order"] == order
