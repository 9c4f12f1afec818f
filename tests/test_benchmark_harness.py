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
    width[width.index("--methods") + 1] = "flap,magnitude"
    assert harness.main(width) == 0
    wrows = json.loads((out / "width.json").read_text())["models"][str(folder)]["rows"]
    assert {(r["method"], r["target"]) for r in wrows} == {(m, t) for m in ("flap", "magnitude") for t in (0.9, 0.7)}
    assert all("error" not in r and r["score_peak_extra_mib"] >= 0 for r in wrows)
    summary = (out / "summary.md").read_text()
    for family in ("| layer |", "| width |", "| Torch-Pruning | tp:l2"):
        assert summary.count(family) == 2, family
