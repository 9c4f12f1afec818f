"""The latency model: tables measured on probes, predictions of plans, latency targets for every
kind of method, the search, the cache and the command line.  Timing is never asserted (tests run
on a busy machine): measured tables are checked for their structure, predictions on hand-made
tables whose numbers are known."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from structlm import cli
from structlm.graph import build_graph
from structlm.latency import LatencyError, LatencyTable, Regime, table_for
from structlm.latency.measure import build_table, ffn_grid, isotonic
from structlm.latency.table import FORMAT, attention_key, fingerprint
from structlm.methods.ziplm import dp_latency, pareto
from structlm.pipeline import make_plan, prune
from structlm.plan import LayerPlan, PrunePlan
from structlm.targets import TargetError, parse_target, parse_targets
from helpers import tiny_llama, tiny_tokenizer
from tiny_models import tiny_config, tiny_inputs, tiny_model


def synthetic_table(graph, *, base=1.0, per_head=0.1, per_group=0.05, per_channel=0.01, joint=0.02,
                    phase="prefill") -> LatencyTable:
    """A table whose numbers follow simple formulas (attention: per query head and per KV group;
    FFN: per channel), every kind alike."""
    per = graph.n_heads // graph.n_kv
    kinds = sorted(set(graph.config.get("layer_types") or ["full_attention"]))
    att = {attention_key(g, q): per_head * g * q + per_group * g for g in range(1, graph.n_kv + 1)
           for q in range(1, per + 1)}
    widths = list(range(8, graph.intermediate, 8)) + [graph.intermediate]
    ffn = [per_channel * w for w in widths]
    dense = att[attention_key(graph.n_kv, per)] + ffn[-1] - joint
    data = {"format": FORMAT, "regime": Regime(phase=phase).to_dict(), "hardware": {"device_name": "test"},
            "software": {"torch": "x", "transformers": "y"}, "model": fingerprint(graph),
            "protocol": {"probe_layers": 1, "rounds": 1, "reps": 1}, "base_ms": base,
            "kinds": {k: {"dense_ms": dense, "attention_ms": att} for k in kinds},
            "ffn": {"widths": widths, "ms": ffn, "step": 8, "align": 8}}
    return LatencyTable(data, "synthetic")


# ---- the table ---------------------------------------------------------------------------------

def test_prediction_adds_up_from_the_table():
    model = tiny_model("llama", num_hidden_layers=4)
    graph = build_graph(model)
    t = synthetic_table(graph)
    per = graph.n_heads // graph.n_kv
    full = 0.1 * graph.n_kv * per + 0.05 * graph.n_kv
    dense_layer = full + 0.01 * graph.intermediate - 0.02
    assert t.dense_ms(graph) == pytest.approx(1.0 + 4 * dense_layer)
    plan = PrunePlan(layers={0: LayerPlan(attention=False), 1: LayerPlan(ffn=False),
                             2: LayerPlan(kv_groups=[0], ffn_channels=list(range(40)))},
                     removed_blocks=[3], family=graph.family)
    got = t.predict(graph, plan)
    layer2 = 0.1 * per + 0.05 + t.ffn_ms(40) - (full + 0.01 * graph.intermediate - dense_layer)
    assert [e["ms"] for e in got["layers"]] == pytest.approx([0.01 * graph.intermediate, full, layer2, 0.0], abs=1e-4)
    assert got["layers"][2]["attention"] == "1x3" and got["layers"][2]["ffn"] == 40
    assert got["total_ms"] == pytest.approx(1.0 + sum(e["ms"] for e in got["layers"]))
    # off-grid widths are interpolated linearly
    assert t.ffn_ms(44) == pytest.approx(0.44)


def test_a_table_refuses_another_shape_and_hidden_pruning():
    graph = build_graph(tiny_model("llama"))
    other = build_graph(tiny_model("llama", intermediate_size=256))
    t = synthetic_table(graph)
    with pytest.raises(LatencyError, match="another model shape.*intermediate"):
        t.predict(other)
    plan = PrunePlan(hidden_channels=list(range(64)), family=graph.family)
    with pytest.raises(LatencyError, match="hidden-channel pruning"):
        t.predict(graph, plan)


def test_isotonic_fit_and_grid():
    assert isotonic([1, 3, 2, 4, 3.5, 5]) == pytest.approx([1, 2.5, 2.5, 3.75, 3.75, 5])
    grid, checks = ffn_grid(1536, 64, 8)
    assert grid[0] == 64 and grid[-1] == 1536 and all(b - a == 64 for a, b in zip(grid, grid[1:]))
    assert len(checks) == 4 and all(c % 8 == 0 and c not in grid for c in checks)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_measured_table_covers_every_configuration(family, tmp_path):
    config = tiny_config(family, num_hidden_layers=3)
    t = build_table(config, Regime.here("prefill", 1, 8, threads=1), probe_layers=2, rounds=2, reps=1,
                    ffn_step=32, progress=False)
    graph = build_graph(tiny_model(family, num_hidden_layers=3))
    per = graph.n_heads // graph.n_kv
    kinds = set(graph.config.get("layer_types") or ["full_attention"])
    assert set(t.data["kinds"]) == kinds
    for k in kinds:
        assert set(t.data["kinds"][k]["attention_ms"]) == {attention_key(g, q) for g in range(1, graph.n_kv + 1)
                                                           for q in range(1, per + 1)}
    ms = t.data["ffn"]["ms"]
    assert all(a <= b for a, b in zip(ms, ms[1:])), "the FFN fit is monotone"
    assert t.data["ffn"]["widths"][-1] == graph.intermediate
    assert t.base_ms > 0 and t.data["dense_check"]["measured_ms"] > 0
    assert t.dense_ms(graph) == pytest.approx(t.data["dense_check"]["measured_ms"], rel=1e-6)  # calibrated
    t.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.dense_ms(graph) == pytest.approx(t.dense_ms(graph))
    # a decode table works too (KV cache of seq tokens)
    d = build_table(config, Regime.here("decode", 1, 8, threads=1), probe_layers=1, rounds=1, reps=1, ffn_step=64,
                    progress=False, check_dense=False)
    assert d.regime.phase == "decode" and d.base_ms > 0


def test_the_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path))
    config = tiny_config("llama")
    graph = build_graph(tiny_model("llama"))
    regime = Regime.here("prefill", 1, 8, threads=1)
    proto = {"probe_layers": 1, "rounds": 1, "reps": 1, "ffn_step": 64}
    first, reused = table_for(graph, config, regime, progress=False, protocol=proto)
    assert not reused and (tmp_path / "latency").is_dir()
    second, reused = table_for(graph, config, regime, progress=False, protocol=proto)
    assert reused and second.data == first.data


def test_bad_tables_are_refused_clearly(tmp_path):
    with pytest.raises(LatencyError, match="does not exist.*structlm latency"):
        LatencyTable.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LatencyError, match="not readable JSON"):
        LatencyTable.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(LatencyError, match="not a structlm-latency/1"):
        LatencyTable.load(tmp_path / "other.json")
    with pytest.raises(LatencyError, match="unknown regime"):
        Regime(phase="train")
    with pytest.raises(LatencyError, match="cudagraph needs a CUDA device"):
        Regime(execution="cudagraph")
    with pytest.raises(LatencyError, match="execution 'compiled' is not measured"):
        Regime(execution="compiled")


def test_latency_cli_refuses_cudagraph_on_cpu(capsys):
    assert cli.main(["latency", "smollm2-135m", "--execution", "cudagraph"]) == 2
    assert "execution cudagraph needs a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_cudagraph_call_replays_the_eager_forward(phase):
    from structlm.latency.regime import TimedCall

    model = tiny_model("llama").to("cuda")
    eager = TimedCall(model, Regime.here(phase, 2, 16, device="cuda"))
    graphed = TimedCall(model, Regime.here(phase, 2, 16, device="cuda", execution="cudagraph"))
    eager.prepare()
    with torch.no_grad():
        expected = eager.body(**eager._args).logits
    for _ in range(2):      # every replay is the same step
        graphed.prepare()
        graphed.run()
        torch.testing.assert_close(graphed._static_out.logits, expected, atol=1e-4, rtol=1e-4)


# ---- targets -----------------------------------------------------------------------------------

def test_latency_targets_parse():
    assert parse_target("speedup=1.5").is_latency
    assert [str(t) for t in parse_targets("speedup=1.25,1.5,2")] == ["speedup=1.25", "speedup=1.5", "speedup=2"]
    assert parse_target("latency_ms=12").value == 12
    with pytest.raises(TargetError, match="more than 1"):
        parse_target("speedup=0.9")
    with pytest.raises(TargetError, match="positive"):
        parse_target("latency_ms=0")


def test_dp_latency_is_optimal():
    import random

    rng = random.Random(0)
    for _ in range(20):
        options = [pareto([(rng.uniform(0, 3), rng.uniform(0, 5), j) for j in range(4)] + [(0.0, 9.0, "gone")])
                   for _ in range(4)]
        budget = rng.uniform(1, 8)
        best = min((sum(o[1] for o in combo), combo) for combo in itertools.product(*options)
                   if sum(o[0] for o in combo) <= budget)
        picked = dp_latency(options, budget, buckets=20000)
        time = sum(options[i][j][0] for i, j in enumerate(picked))
        error = sum(options[i][j][1] for i, j in enumerate(picked))
        assert time <= budget + 1e-9
        assert error == pytest.approx(best[0], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("method", ["ziplm", "modegpt", "wanda_sp", "magnitude", "flap", "llm_pruner", "shortgpt",
                                    "finercut", "last_blocks"])
@pytest.mark.parametrize("target", ["speedup=1.3", "latency_ms=9"])
def test_every_method_meets_a_latency_target(method, target):
    model = tiny_model("llama", num_hidden_layers=4)
    graph = build_graph(model)
    table = synthetic_table(graph)
    calib = tiny_inputs(model.config, batch=4, seq=12)
    options = {"progress": False} if method in ("ziplm", "modegpt") else {}
    if method == "llm_pruner":
        options["layers"] = "all"
    plan, info, _ = make_plan(model, method=method, target=target, calib=calib, graph=graph, options=options,
                              latency_table=table)
    t = parse_target(target)
    budget = table.dense_ms(graph) / t.value if t.kind == "speedup" else t.value
    got = table.predict(graph, plan)["total_ms"]
    assert got <= budget + 1e-6
    assert info["latency"]["predicted_ms"] == pytest.approx(got, abs=1e-3)
    assert info["latency"]["budget_ms"] == pytest.approx(budget, abs=1e-3)
    assert len(info["latency"]["layers"]) == graph.n_layers
    if method in ("ziplm", "wanda_sp", "magnitude"):   # fine-grained: close to the budget, not far below
        assert got >= 0.85 * budget


def test_ziplm_trades_width_and_depth_under_a_latency_budget():
    model = tiny_model("llama", num_hidden_layers=4)
    graph = build_graph(model)
    table = synthetic_table(graph, per_channel=0.02)
    calib = tiny_inputs(model.config, batch=4, seq=12)
    before = model.state_dict()
    result = prune(model, "ziplm", "speedup=3", calib, options={"progress": False}, latency_table=table)
    assert result.info["allocation"] == "dp_latency"
    assert table.predict(graph, result.plan)["total_ms"] <= table.dense_ms(graph) / 3 + 1e-6
    assert result.info["latency"]["predicted_speedup"] >= 3 - 1e-6
    assert before.keys() != model.state_dict().keys() or any(
        before[k].shape != v.shape for k, v in model.state_dict().items())


def test_out_of_reach_latency_targets_say_how_far_they_go():
    model = tiny_model("llama", num_hidden_layers=4)
    graph = build_graph(model)
    table = synthetic_table(graph, base=5.0)     # the fixed rest alone is most of the time
    calib = tiny_inputs(model.config, batch=4, seq=12)
    with pytest.raises(ValueError, match=r"out of reach.*speedup="):
        make_plan(model, method="magnitude", target="speedup=3", calib=calib, graph=graph, latency_table=table)
    with pytest.raises(ValueError, match=r"out of reach.*speedup="):
        make_plan(model, method="ziplm", target="speedup=4", calib=calib, graph=graph, latency_table=table,
                  options={"progress": False})
    with pytest.raises(ValueError, match=r"out of reach.*speedup=.*ziplm"):
        make_plan(model, method="modegpt", target="speedup=3", calib=calib, graph=graph, latency_table=table,
                  options={"progress": False})
    with pytest.raises(ValueError, match=r"modegpt: a latency target .* include ffn"):
        make_plan(model, method="modegpt", target="speedup=1.1", calib=calib, graph=graph, latency_table=table,
                  options={"progress": False, "modules": "vo"})
    with pytest.raises(ValueError, match=r"cannot be met.*fastest"):
        make_plan(model, method="shortgpt", target="speedup=4", calib=calib, graph=graph, latency_table=table)
    with pytest.raises(ValueError, match="hidden-channel pruning"):
        make_plan(model, method="magnitude", target="speedup=1.2", calib=calib, graph=graph, latency_table=table,
                  options={"prune_hidden": True})


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-latency")
    tiny_llama(layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_latency_verb_and_prune_with_a_table(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STRUCTLM_CACHE", str(tmp_path / "cache"))
    table_file = tmp_path / "table.json"
    assert cli.main(["latency", str(tiny_folder), "--seq", "8", "--threads", "1", "--out", str(table_file)]) == 0
    out = capsys.readouterr().out
    assert "attention only" in out and "FFN only" in out and "measured and cached" in out
    assert cli.main(["latency", str(tiny_folder), "--seq", "8", "--threads", "1"]) == 0
    assert "reused the cached table" in capsys.readouterr().out
    # a table of fixed numbers, so the plan does not depend on this machine's timing
    table = LatencyTable.load(table_file)
    synthetic = synthetic_table(build_graph(tiny_llama(layers=4)))
    synthetic.data["model"] = table.data["model"]
    synthetic.save(table_file)
    out_dir = tmp_path / "out"
    code = cli.main(["prune", str(tiny_folder), "--method", "magnitude", "--target", "speedup=1.2,1.5",
                     "--latency-table", str(table_file), "--out", str(out_dir), "--no-eval", "--calib-samples", "4",
                     "--calib-len", "16"])
    assert code == 0, capsys.readouterr().err
    for sub in ("speedup=1.2", "speedup=1.5"):
        report = json.loads((out_dir / sub / "report.json").read_text())
        lat = report["method_info"]["latency"]
        assert lat["predicted_speedup"] >= float(sub.split("=")[1]) - 1e-6
        assert (out_dir / sub / "latency.png").is_file()
    assert cli.main(["prune", str(tiny_folder), "--method", "magnitude", "--target", "speedup=1.2",
                     "--latency-table", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o2"),
                     "--no-eval"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("method", ["finercut", "sleb"])
def test_methods_benchmark_greedy_prefix_is_the_direct_search(method):
    """benchmarks/latency.py searches a greedy method once, to the harshest speedup target; the
    milder targets' plans (prefixes of its removal order) equal a search to each of them."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_latency", Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_model("llama", num_hidden_layers=6)
    graph = build_graph(model)
    table = synthetic_table(graph)
    calib = tiny_inputs(model.config, batch=4, seq=12)
    opts = {"progress": False}
    _, info, stats = make_plan(model, method=method, target="speedup=1.8", calib=calib, graph=graph,
                               latency_table=table, options=dict(opts))
    info["search_seconds"] = stats["score_seconds"]
    for target in ("speedup=1.2", "speedup=1.5", "speedup=1.8"):
        plan, seconds = bench.greedy_prefix(graph, method, info, target, table)
        direct, _, _ = make_plan(model, method=method, target=target, calib=calib, graph=graph,
                                 latency_table=table, options=dict(opts))
        assert plan.to_dict()["layers"] == direct.to_dict()["layers"], target
        assert plan.removed_blocks == direct.removed_blocks, target
        assert 0 <= seconds <= stats["score_seconds"] + 1e-6
