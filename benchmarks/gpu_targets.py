"""Latency tables and ziplm's speedup targets on a GPU, from the model's config and a level database.

    python benchmarks/gpu_targets.py --levels DIR [--model smollm2-135m] [--speedups 1.25,1.5]
                                     [--executions eager,cudagraph] [--batch 1] [--seq 128]
                                     [--dtype bfloat16] [--rounds 15] [--out DIR]

The deployment workflow of docs/speed.md, on the GPU: for each execution (``eager``: stock forward
calls; ``cudagraph``: the forward captured once and replayed, as serving engines run small
batches) the GPU's latency table is built from the config alone (benchmarks/configs/MODEL.json,
random weights) and validated (the dense model and six plans timed end to end,
structlm.latency.validate).  Then, for each speedup target, ziplm's levels are allocated under
that table on the host's CPU -- what `structlm prune MODEL --method ziplm --latency-table
gpu.json` does on any machine; the level database was computed on a CPU beforehand with the real
model and calibration (`structlm prune MODEL --method ziplm --target params=0.8 --save-levels
DIR`) -- and a random-weight model of the config, shrunk by the plan, is timed beside the dense
model on the GPU (paired, ``--rounds`` rounds).  Latency depends on the shapes, not on the weight
values, so no checkpoint, tokenizer or hub is needed here.

Writes into --out: gpu_targets.{json,md}, each table (table-EXECUTION.json, usable as
``--latency-table``) and each plan (plan-EXECUTION-speedupX.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # run from a checkout without installing
sys.path.insert(1, str(HERE))

from gpu_latency import load_config                                       # noqa: E402

from structlm.graph import build_graph                                   # noqa: E402
from structlm.latency import Regime, measure_models                       # noqa: E402
from structlm.latency.measure import build_table, random_model           # noqa: E402
from structlm.latency.regime import device_name, software                 # noqa: E402
from structlm.latency.validate import validate_table                      # noqa: E402
from structlm.methods.ziplm import LevelDatabase, allocate_levels, plan_from_choice   # noqa: E402
from structlm.pipeline import latency_summary                             # noqa: E402
from structlm.surgery import shrink                                       # noqa: E402
from structlm.targets import parse_target                                 # noqa: E402


def targets_for(table, graph, config, db, speedups, rounds, out: Path, execution: str) -> list[dict]:
    dense = random_model(config)
    variants, rows = {"dense": dense}, []
    for x in speedups:
        target = parse_target(f"speedup={x:g}").with_latency(table)
        start = time.perf_counter()
        choice, info = allocate_levels(db, graph, target)
        plan = plan_from_choice(db, graph, choice, align=8)
        seconds = time.perf_counter() - start
        (out / f"plan-{execution}-speedup{x:g}.json").write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
        predicted = latency_summary(table, graph, plan)["predicted_speedup"]
        variants[f"speedup={x:g}"] = shrink(copy.deepcopy(dense), plan, graph)
        kept = plan.cost(graph)["params"] / graph.total_params
        rows.append({"target": f"speedup={x:g}", "predicted_speedup": predicted, "params_kept": kept,
                     "allocation_seconds": round(seconds, 2), "removed_blocks": len(plan.removed_blocks),
                     "shapes": [f"{r['kv_heads']}kv/{r['ffn_channels']}" for r in plan.shapes(graph)]})
    regime = table.regime
    for m in variants.values():
        m.to(regime.device, regime.torch_dtype)
    measured = measure_models(variants, regime, rounds=rounds, progress=False)
    for row in rows:
        m = measured[row["target"]]
        row.update(measured_speedup=m["speedup"], spread=m["spread"], measured_ms=m["ms"],
                   dense_ms=measured["dense"]["ms"])
    return rows


def markdown(result: dict) -> str:
    md = [f"# Latency tables and ziplm speedup targets on {result['environment']['device']}", "",
          f"`{result['command']}`", "", f"Environment: {json.dumps(result['environment'])}", ""]
    for e in result["executions"]:
        if "error" in e:
            md += [f"## {e['execution']}: failed", "", f"`{e['error']}`", ""]
            continue
        t, v = e["table"], e["validation"]
        md += [f"## {e['regime']}", "",
               f"Table built in {t['built_seconds']:.0f} s; dense predicted {t['dense_predicted_ms']:.3f} ms; "
               f"FFN interpolation error max {100 * t['interpolation_max']:.1f}%. Validation ({v['rounds']} rounds, "
               f"largest speedup error {100 * v['max_abs_speedup_error']:.1f}%):", "",
               "| plan | predicted ms | measured ms | predicted x | measured x | speedup error |", "|---|---|---|---|---|---|"]
        md += [f"| {r['plan']} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | {r['predicted_speedup']:.3f} | "
               f"{r['measured_speedup']:.3f} | {100 * r['speedup_error']:+.1f}% |" for r in v["rows"]]
        md += ["", "ziplm at speedup targets (levels from the CPU, allocation under this table, timed here):", "",
               "| target | predicted x | measured x | measured / asked | spread | params kept | removed blocks |",
               "|---|---|---|---|---|---|---|"]
        for r in e["targets"]:
            asked = float(r["target"].split("=")[1])
            md.append(f"| {r['target']} | {r['predicted_speedup']:.3f} | {r['measured_speedup']:.3f} | "
                      f"{r['measured_speedup'] / asked:.3f} | {100 * r['spread']:.0f}% | {100 * r['params_kept']:.1f}% | "
                      f"{r['removed_blocks']} |")
        md.append("")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--levels", required=True, help="ziplm level database folder (--save-levels)")
    ap.add_argument("--speedups", default="1.25,1.5", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--executions", default="eager,cudagraph", type=lambda s: s.split(","))
    ap.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_targets"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.model)
    graph = build_graph(config)
    db = LevelDatabase.load(args.levels)
    result = {"command": "python benchmarks/gpu_targets.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "environment": {"device": device_name(args.device), **software(), "python": platform.python_version()},
              "model": args.model, "executions": []}
    for execution in args.executions:
        entry = {"execution": execution}
        try:
            regime = Regime.here(args.phase, args.batch, args.seq, device=args.device, dtype=args.dtype,
                                 execution=execution)
            entry["regime"] = regime.describe()
            table = build_table(config, regime, progress=False)
            table.save(out / f"table-{execution}.json")
            validation = validate_table(table, config, rounds=args.rounds, progress=False)
            entry["table"] = {"built_seconds": table.data["built_seconds"],
                              "dense_predicted_ms": table.data["dense_predicted_ms"],
                              "interpolation_max": table.data.get("interpolation", {}).get("max_rel_error", 0.0),
                              "dense_check": table.data.get("dense_check")}
            entry["validation"] = validation
            entry["targets"] = targets_for(table, graph, config, db, args.speedups, args.rounds, out, execution)
        except Exception as e:   # one execution failing (e.g. a capture the driver refuses) keeps the others
            entry["error"] = f"{type(e).__name__}: {e}"
        result["executions"].append(entry)
        (out / "gpu_targets.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in entry.items() if k != "validation"}, indent=1), flush=True)
    (out / "gpu_targets.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
