"""benchmarks/run.py end to end on a tiny local model: rows, prefixes of greedy searches, tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bench-model")
    tiny_llama(layers=6).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_layer_suite_rows_and_greedy_prefixes(folder, tmp_path):
    harness = load_harness()
    out = tmp_path / "results"
    argv = ["--suite", "layer", "--models", str(folder), "--targets", "0.9,0.7", "--methods", "sleb,shortgpt,tp:l2",
            "--limit", "0", "--eval-tokens", "4096", "--calib-samples", "4", "--calib-len", "32",
            "--threads", "1", "--results", str(out)]
    assert harness.main(argv) == 0
    result = json.loads((out / "layer.json").read_text())
    block = result["models"][str(folder)]
    rows = {(r["method"], r["target"]): r for r in block["rows"]}
    assert set(rows) == {(m, t) for m in ("sleb", "shortgpt", "tp:l2") for t in (0.9, 0.7)}
    for row in rows.values():
        assert "error" not in row, row
        kept = row["params"] / block["dense"]["params"]
        if row["method"].startswith("tp:"):   # TP's ratio search: as close as its coarse steps allow
            assert abs(kept - row["target"]) < 0.05
        else:                                 # structlm's methods never stop short of the target
            assert kept <= row["target"]
        assert row["ppl"] > 0 and row["prefill_ms"] > 0
    # the milder target's SLEB blocks are a prefix of the harsher one's search
    mild = set(rows["sleb", 0.9]["removed"].removeprefix("blocks ").split(","))
    harsh = set(rows["sleb", 0.7]["removed"].removeprefix("blocks ").split(","))
    assert mild < harsh
    assert rows["sleb", 0.9]["prune_seconds"] <= rows["sleb", 0.7]["prune_seconds"]
    table = (out / "layer.md").read_text()
    assert table.count("| sleb |") == 2 and "Removed (layer methods)" in table
    # a rerun skips the rows that are already there
    assert harness.main(argv) == 0
    assert len(json.loads((out / "layer.json").read_text())["models"][str(folder)]["rows"]) == 6
    for row in rows.values():   # latency measured beside a dense run, in the same rounds
        assert row["dense_prefill_ms"] > 0 and row["decode_ms"] > 0
    # re-measuring latency rebuilds each row's model from its plan (or TP ratio), nothing else changes
    before = json.loads((out / "layer.json").read_text())
    old = before["models"][str(folder)]["rows"][0]   # rows of older runs: removal text, latency without dense
    del old["plan"], old["dense_prefill_ms"], old["dense_decode_ms"]
    (out / "layer.json").write_text(json.dumps(before))
    assert harness.main([*argv, "--refresh-latency"]) == 0
    after = json.loads((out / "layer.json").read_text())
    assert [r["ppl"] for r in after["models"][str(folder)]["rows"]] == [r["ppl"] for r in before["models"][str(folder)]["rows"]]
    assert "latency_command" in after
    assert after["models"][str(folder)]["rows"][0]["dense_prefill_ms"] > 0
    # with the width suite too: the best of each family side by side
    width = ["--suite", "width", *argv[2:]]
    width[width.index("--methods") + 1] = "flap,magnitude[gqa=query_heads,layers=1:]"
    assert harness.main(width) == 0
    wrows = json.loads((out / "width.json").read_text())["models"][str(folder)]["rows"]
    variant = "magnitude[gqa=query_heads,layers=1:]"
    assert {(r["method"], r["target"]) for r in wrows} == {(m, t) for m in ("flap", variant) for t in (0.9, 0.7)}
    assert all("error" not in r and r["score_peak_extra_mib"] >= 0 for r in wrows)
    for r in wrows:   # a method with options in brackets runs with them, and the row says so
        if r["method"] == variant:
            assert r["options"] == {"gqa": "query_heads", "layers": "1:"}
            assert "0" not in r["plan"]["layers"] and r["plan"]["layers"]   # layer 0 left whole
            assert not any("kv_groups" in lp for lp in r["plan"]["layers"].values())   # heads, never groups
    summary = (out / "summary.md").read_text()
    for family in ("| layer |", "| width |", "| Torch-Pruning | tp:l2"):
        assert summary.count(family) == 2, family


def load_gpu_latency():
    spec = importlib.util.spec_from_file_location("bench_gpu_latency", ROOT / "benchmarks" / "gpu_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_latency_unaligned_control_is_the_same_plan_one_channel_narrower_and_unaligned(tmp_path):
    from structlm.pipeline import prune
    from structlm.plan import LayerPlan, PrunePlan

    gpu = load_gpu_latency()
    plan = PrunePlan(layers={0: LayerPlan(kv_groups=[0], ffn_channels=list(range(48))),
                             1: LayerPlan(ffn_channels=list(range(40)))}, align=8)
    control = gpu.unaligned_control(plan)
    assert control.align == 1 and plan.align == 8   # the original is left as it was
    assert [len(control.layers[i].ffn_channels) for i in (0, 1)] == [47, 39]
    assert control.layers[0].kv_groups == [0]
    model = prune(tiny_llama(), plan=control).model
    summary = gpu.shapes(model)
    assert summary["ffn_widths"] == [39, 47] and summary["ffn_unaligned_layers"] == 2   # not rounded back
    assert (summary["blocks"], summary["q_heads"], summary["kv_heads"], summary["hidden"]) == (2, 6, 3, 32)
    aligned = gpu.shapes(prune(tiny_llama(), plan=plan).model)
    assert aligned["ffn_widths"] == [40, 48] and aligned["ffn_unaligned_layers"] == 0


def test_gpu_latency_times_each_shape_once_in_priority_order(tmp_path):
    gpu = load_gpu_latency()
    layers = {str(i): {"ffn_channels": list(range(8))} for i in range(2)}
    rows = {"layer": [{"method": "tp:l2", "target": 0.9, "tp_ratio": 0.1, "ppl": 9.0},
                      {"method": "sleb", "target": 0.8, "removed": "blocks 1", "ppl": 5.0}],
            "width": [{"method": "tp:l2", "target": 0.9, "tp_ratio": 0.1, "ppl": 9.0},
                      {"method": "flap", "target": 0.9, "plan": {"layers": layers}, "ppl": 3.0},
                      {"method": "flap", "target": 0.8, "plan": {"layers": layers}, "ppl": 4.0},
                      {"method": "wanda_sp", "target": 0.8, "plan": {"layers": layers}, "ppl": 6.0},
                      {"method": "magnitude", "target": 0.8, "error": "WidthError: out of reach"}]}
    for suite, suite_rows in rows.items():
        (tmp_path / f"{suite}.json").write_text(json.dumps({"models": {"m": {"rows": suite_rows}}}))
    got = [(r["suite"], r["method"], r["target"]) for r in gpu.variants_of("m", tmp_path, [0.9, 0.8])]
    assert got == [("width", "flap (unaligned control)", 0.8),   # the best width plan at 80%, unaligned
                   ("layer", "sleb", 0.8), ("width", "flap", 0.8), ("width", "wanda_sp", 0.8),
                   ("layer", "tp:l2", 0.9), ("width", "flap", 0.9)]


def test_method_specs_carry_their_options():
    harness = load_harness()
    assert harness.split_methods("flap,wanda_sp[gqa=query_heads,layers=all],sleb") == \
        ["flap", "wanda_sp[gqa=query_heads,layers=all]", "sleb"]
    assert harness.method_spec("wanda_sp[gqa=query_heads,floor=0.25]") == ("wanda_sp", {"gqa": "query_heads",
                                                                                          "floor": 0.25})
    assert harness.method_spec("sleb") == ("sleb", harness.METHOD_OPTIONS["sleb"])
    assert harness.method_spec("sleb[lazy=false]")[1]["lazy"] is False   # over the benchmark's own options


def test_summary_prefers_rows_that_reach_the_target(tmp_path):
    harness = load_harness()

    def row(method, kept, ppl):
        return {"method": method, "target": 0.7, "params": kept * 1000, "ppl": ppl, "prefill_ms": 1.0, "decode_ms": 1.0}
    dense = {"params": 1000, "ppl": 10.0, "prefill_ms": 2.0, "decode_ms": 2.0}
    layer = {"models": {"m": {"dense": dense, "rows": [row("sleb", 0.69, 50.0), row("tp:l2", 0.698, 900.0)]}}}
    width = {"models": {"m": {"dense": dense, "rows": [row("flap", 0.70, 40.0),
                                                       row("tp:taylor-hidden-kept", 0.749, 300.0)]}}}
    (tmp_path / "layer.json").write_text(json.dumps(layer))
    (tmp_path / "width.json").write_text(json.dumps(width))
    harness.write_summary(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| Torch-Pruning | tp:l2 | 69.8% |" in summary   # the Taylor run stopped at 74.9% kept
    width["models"]["m"]["rows"] = width["models"]["m"]["rows"][:1]
    layer["models"]["m"]["rows"] = layer["models"]["m"]["rows"][:1] + [row("tp:l2", 0.76, 900.0)]
    (tmp_path / "layer.json").write_text(json.dumps(layer))
    (tmp_path / "width.json").write_text(json.dumps(width))
    harness.write_summary(tmp_path)   # where no run reaches it, the closest there is still shows
    assert "| Torch-Pruning | tp:l2 | 76.0% |" in (tmp_path / "summary.md").read_text()


def test_replace_reruns_only_the_named_rows_in_their_place(folder, tmp_path):
    harness = load_harness()
    out = tmp_path / "results"
    argv = ["--suite", "width", "--models", str(folder), "--targets", "0.9", "--limit", "0", "--eval-tokens", "4096",
            "--calib-samples", "4", "--calib-len", "32", "--threads", "1", "--results", str(out)]
    assert harness.main([*argv, "--methods", "magnitude,wanda_sp"]) == 0
    path = out / "width.json"
    result = json.loads(path.read_text())
    for row in result["models"][str(folder)]["rows"]:   # mark the old rows
        row["ppl"] = -1.0
    path.write_text(json.dumps(result))
    assert harness.main([*argv, "--methods", "magnitude"]) == 0   # without --replace: skipped
    assert [r["ppl"] for r in json.loads(path.read_text())["models"][str(folder)]["rows"]] == [-1.0, -1.0]
    assert harness.main([*argv, "--methods", "magnitude", "--replace"]) == 0
    rows = json.loads(path.read_text())["models"][str(folder)]["rows"]
    assert [r["method"] for r in rows] == ["magnitude", "wanda_sp"]   # in its place, the other row kept
    assert rows[0]["ppl"] > 0 and rows[1]["ppl"] == -1.0
    with pytest.raises(SystemExit) as caught:   # --replace needs the methods named
        harness.main([*argv, "--replace"])
    assert caught.value.code == 2


def test_put_row_replaces_every_earlier_row_of_the_method_and_target():
    harness = load_harness()
    rows = [{"method": "a", "target": 0.9, "v": 1}, {"method": "b", "target": 0.9, "v": 2},
            {"method": "a", "target": 0.9, "v": 3}, {"method": "a", "target": 0.7, "v": 4}]
    harness.put_row(rows, {"method": "a", "target": 0.9, "v": 5})
    assert [r["v"] for r in rows] == [5, 2, 4]
    harness.put_row(rows, {"method": "c", "target": 0.9, "v": 6})
    assert [r["v"] for r in rows] == [5, 2, 4, 6]
