"""CPU latency of SmolLM2-135M shrunk by 25% (width: 2 of 3 KV groups + FFN 1024; depth: 10 blocks)
against dense, plus the time and peak memory of shrinking and saving.

    .venv/bin/python benchmarks/shrink_latency.py [--threads 2] [--rounds 5]

Dense and pruned models are timed in alternating rounds so that load from other processes
hits both alike; each figure is the median over rounds of each round's median.
Writes benchmarks/results/shrink_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from structlm import evaluate, export, models, surgery
from structlm.graph import build_graph
from structlm.pipeline import PeakMemory
from structlm.plan import LayerPlan, PrunePlan

RESULTS = Path(__file__).resolve().parent / "results"


def width_plan() -> PrunePlan:
    return PrunePlan(layers={i: LayerPlan(kv_groups=[0, 1], ffn_channels=list(range(1024))) for i in range(30)},
                     meta={"name": "width: 2/3 KV groups + FFN 1024"})


def depth_plan() -> PrunePlan:
    return PrunePlan(removed_blocks=list(range(18, 28)), meta={"name": "depth: blocks 18-27 removed"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, tok = models.load_model("smollm2-135m")
    graph = build_graph(dense)
    model_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    variants = {"dense": (dense, None)}
    rows = {"dense": {"params": models.count_parameters(dense)}}
    for plan in (width_plan(), depth_plan()):
        name = plan.meta["name"]
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        with PeakMemory() as mem:
            surgery.shrink(model, plan, graph)
        shrink_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            export.save(model, tok, Path(tmp) / "out", plan=plan)
            save_s = time.perf_counter() - start
            fmt = json.loads((Path(tmp) / "out" / "report.json").read_text())["format"]
        variants[name] = (model, plan)
        rows[name] = {"params": models.count_parameters(model), "shrink_seconds": round(shrink_s, 3),
                      "shrink_peak_extra_mib": round(mem.extra_bytes / 2**20, 1), "save_seconds": round(save_s, 2),
                      "checkpoint": fmt}
    timings = {name: {"prefill": [], "decode": []} for name in variants}
    for _ in range(args.rounds):  # alternate so that background load hits every variant alike
        for name, (model, _) in variants.items():
            lat = evaluate.latency(model, batch_size=args.batch, seq_len=args.seq, decode_tokens=16, warmup=1,
                                   repeats=3, progress=False)
            timings[name]["prefill"].append(lat["prefill_ms"])
            timings[name]["decode"].append(lat["decode_ms_per_token"])
    for name, t in timings.items():
        rows[name]["prefill_ms"] = round(statistics.median(t["prefill"]), 2)
        rows[name]["decode_ms_per_token"] = round(statistics.median(t["decode"]), 2)
        rows[name]["params_kept"] = round(rows[name]["params"] / rows["dense"]["params"], 4)
        rows[name]["prefill_speedup"] = round(rows["dense"]["prefill_ms"] / rows[name]["prefill_ms"], 3) \
            if "prefill_ms" in rows["dense"] else 1.0
        rows[name]["decode_speedup"] = round(rows["dense"]["decode_ms_per_token"] / rows[name]["decode_ms_per_token"], 3) \
            if "decode_ms_per_token" in rows["dense"] else 1.0
    result = {"benchmark": "shrink_latency", "model": "smollm2-135m", "model_mib": round(model_bytes / 2**20, 1),
              "device": "cpu", "threads": args.threads, "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": "python benchmarks/shrink_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shrink_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Shrink and CPU latency: SmolLM2-135M, 25% smaller", "",
             f"`{result['command']}` — CPU, {args.threads} threads, prefill batch {args.batch} x {args.seq} tokens, "
             f"decode per token with KV cache; median of {args.rounds} alternating rounds. Model {result['model_mib']} MiB fp32.",
             "", "| variant | params kept | prefill ms | prefill speedup | decode ms/token | decode speedup | shrink s | shrink peak extra MiB | checkpoint |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['params_kept']:.1%} | {r['prefill_ms']} | x{r['prefill_speedup']} | "
                     f"{r['decode_ms_per_token']} | x{r['decode_speedup']} | {r.get('shrink_seconds', '-')} | "
                     f"{r.get('shrink_peak_extra_mib', '-')} | {r.get('checkpoint', '-')} |")
    (RESULTS / "shrink_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
