"""ZipLM's evolutionary search (-O search=evo): budgets, elitism, determinism, the fitness model,
options, and exactness of the plan it gives (tiny models)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from structlm import surgery
from structlm.graph import build_graph
from structlm.methods import _evo, get
from structlm.methods import ziplm as Z
from structlm.targets import parse_target
from test_latency import synthetic_table
from test_surgery import assert_shrink_equals_mask
from tiny_models import tiny_model


def _calib(model, n=16, length=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_hidden_layers=4)
    graph = build_graph(model)
    calib = _calib(model)
    db = Z.build_levels(model, graph, calib, progress=False)
    return model, graph, calib, db


def _refine(setup, target, **kw):
    model, graph, calib, db = setup
    t = parse_target(target)
    start, _ = Z.allocate_levels(db, graph, t)
    args = dict(generations=6, offspring=6, seconds=math.inf, tokens=16 * 24, seed=0, damp=0.01, batch_size=8,
                progress=False)
    args.update(kw)
    record = []
    choice, report = _evo.refine(model, graph, db, t, start, calib, record=record, **args)
    return start, choice, report, record


def test_every_candidate_meets_the_params_budget_and_the_best_beats_the_start(setup):
    model, graph, calib, db = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start, choice, report, record = _refine(setup, "params=0.7")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())    # restored
    budget = math.floor(0.7 * graph.total_params)
    assert len(record) == report["evaluations"] > report["generations"] >= 1
    for cand, _, _ in record:   # priced by the plan's own accounting, not the search's
        assert Z.plan_from_choice(db, graph, cand, 8).cost(graph)["params"] <= budget
    assert report["fitness_dp"] == record[0][2] and record[0][0] == start
    assert report["fitness_best"] <= report["fitness_dp"]
    assert report["history"] == sorted(report["history"], reverse=True)        # elitism: never worse
    full = [f for c, seqs, f in record if len(seqs) == 16 and c == choice]
    assert full and min(full) == report["fitness_best"]


def test_every_candidate_meets_the_latency_budget(setup):
    model, graph, calib, db = setup
    table = synthetic_table(graph, per_channel=0.02)
    target = parse_target("speedup=1.6").with_latency(table)
    start, _ = Z.allocate_levels(db, graph, target)
    record = []
    choice, report = _evo.refine(model, graph, db, target, start, calib, generations=6, offspring=6,
                                 seconds=math.inf, tokens=16 * 24, seed=1, damp=0.01, batch_size=8, progress=False,
                                 record=record)
    budget = table.dense_ms(graph) / 1.6
    assert report["budget"] == "latency" and len(record) > 6
    for cand, _, _ in record:
        assert table.predict(graph, Z.plan_from_choice(db, graph, cand, 8))["total_ms"] <= budget + 1e-9
    assert report["fitness_best"] <= report["fitness_dp"]


def test_zero_generations_return_the_dp_choice_and_the_seed_makes_it_deterministic(setup):
    start, choice, report, record = _refine(setup, "params=0.75", generations=0)
    assert choice == start and report["generations"] == 0 and report["evaluations"] == 1 and report["history"] == []
    assert report["fitness_best"] == report["fitness_dp"]
    a = _refine(setup, "params=0.75", seed=3)
    b = _refine(setup, "params=0.75", seed=3)
    assert a[1] == b[1] and a[2]["history"] == b[2]["history"]
    assert [r[0] for r in a[3]] == [r[0] for r in b[3]]


@pytest.mark.parametrize("keep_reference", [True, False])
def test_the_fitness_is_the_kl_of_the_masked_plan_with_dense_input_reconstruction(setup, keep_reference, monkeypatch):
    """The search scores exactly the model the plan with -O sequential=false reconstruction gives
    (dense log-probabilities kept, or recomputed from the dense final hidden states)."""
    model, graph, calib, db = setup
    if not keep_reference:
        monkeypatch.setattr(_evo, "REFERENCE_BYTES", 0)
    start, _ = Z.allocate_levels(db, graph, parse_target("params=0.7"))
    n_fit = 4
    asm = _evo.Assembler(model, graph, db, calib, n_fit, damp=0.01, batch_size=3, progress=False)
    assert asm.keep_logprobs == keep_reference
    try:
        got = asm.fitness(start, list(range(n_fit)))
        again = asm.fitness(start, [2, 0])           # a subset: the same per-token KL on those sequences
    finally:
        asm.restore()
    plan = Z.plan_from_choice(db, graph, start, 8)
    plan.updates, _ = Z.reconstruct(model, graph, plan, calib, sequential=False, progress=False)
    ids = calib[:n_fit]
    with torch.no_grad():
        dense = F.log_softmax(model(ids).logits.float(), -1)
        mine = F.log_softmax(surgery.mask(copy.deepcopy(model), plan, graph)(ids).logits.float(), -1)
    kl = (dense.exp() * (dense - mine)).sum(-1)
    assert got == pytest.approx(float(kl.mean()), rel=2e-3, abs=1e-7)
    assert again == pytest.approx(float(kl[[0, 2]].mean()), rel=2e-3, abs=1e-7)


def test_the_method_reports_the_search_and_its_plan_shrinks_exactly():
    model = tiny_model("qwen3", num_hidden_layers=3)
    graph = build_graph(model)
    calib = _calib(model)
    plan, info = get("ziplm")(model, graph, "params=0.75", calib, progress=False, search="evo", evo_generations=3,
                              evo_offspring=4, evo_tokens=200)
    s = info["search"]
    assert s["method"] == "evo" and s["generations"] == 3 and len(s["history"]) == 3
    assert s["fitness_best"] <= s["fitness_dp"] and s["fitness_tokens"] == 9 * 24
    assert graph.total_params - plan.cost(graph)["params"] == info["planned_removed_params"]
    assert plan.cost(graph)["params"] <= 0.75 * graph.total_params and plan.updates
    assert_shrink_equals_mask(model, plan, graph)
    _, info_dp = get("ziplm")(model, graph, "params=0.75", calib, progress=False)
    assert info_dp["search"] == {"method": "dp"}


def test_a_time_budget_stops_the_search():
    model = tiny_model("llama", num_hidden_layers=2)
    graph = build_graph(model)
    _, info = get("ziplm")(model, graph, "params=0.8", _calib(model), progress=False, search="evo",
                           evo_generations=10 ** 6, evo_seconds=0.5)
    assert info["search"]["stopped"] == "seconds" and info["search"]["fitness_best"] <= info["search"]["fitness_dp"]


@pytest.mark.parametrize("options, message", [
    ({"search": "anneal"}, "unknown search 'anneal'; choose from dp, evo"),
    ({"evo_generations": 5}, "set.s. the evolutionary search; add -O search=evo"),
    ({"search": "evo", "evo_generations": -1}, "evo_generations must be a whole number >= 0"),
    ({"search": "evo", "evo_offspring": 0}, "evo_offspring must be a whole number >= 1"),
    ({"search": "evo", "evo_offspring": 2.5}, "evo_offspring must be a whole number"),
    ({"search": "evo", "evo_tokens": "many"}, "evo_tokens must be a whole number >= 1"),
    ({"search": "evo", "evo_seed": True}, "evo_seed must be a whole number >= 0"),
    ({"search": "evo", "evo_seconds": 0}, "evo_seconds must be a positive number"),
    ({"search": "evo", "allocation": "uniform"}, "search=evo refines the dynamic programme's choice"),
])
def test_bad_search_options_are_refused(options, message):
    model = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(Z.ZipLMError, match=message):
        get("ziplm")(model, build_graph(model), "params=0.8", _calib(model), progress=False, **options)
