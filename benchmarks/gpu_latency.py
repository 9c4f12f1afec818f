"""GPU latency of every benchmarked model shape against the dense model, on the GPU it runs on.

    python benchmarks/gpu_latency.py                       # all committed rows, both models
    python benchmarks/gpu_latency.py --models smollm2-135m --targets 0.8 --budget-seconds 300

Latency depends on the tensor shapes, not on the weight values. So every pruned model of the
committed quality benchmarks (benchmarks/results/{layer,width}.json) is rebuilt from its stored
plan on a randomly initialised model of the same config (benchmarks/configs/<model>.json):
no checkpoint, tokenizer or hub is needed on the GPU machine. Torch-Pruning rows are rebuilt with
their stored ratio and L2 importance: its recipe prunes every layer by the same ratio
(global_pruning=False), so its widths depend on the ratio alone, not on the importance.

Two controls show what width alignment is worth: the best width plan at 80% kept, and the same
plan with one more FFN channel removed per layer, unaligned (align=1, widths like 1023).

Each variant is timed with stock transformers in bf16 (SDPA attention): prefill of 1 x 128 and
16 x 512 tokens, and one decoding step with a KV cache at batch 1 and 16 (CUDA events, median of
--repeats after --warmup). The dense model is timed at the start and the end of each model's
variants; speedups are against the mean of the two, and their difference is reported as drift.
Variants run in priority order (80% kept first) until --budget-seconds are spent.
Writes benchmarks/results/gpu_latency.{json,md} (or --results).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))   # run from a checkout without installing

from structlm import evaluate, models   # noqa: E402
from structlm.plan import PrunePlan     # noqa: E402

CONFIGS = HERE / "configs"
PRIORITY = [0.8, 0.5, 0.7, 0.9]                 # targets (fraction kept) in the order they are timed


def load_harness():
    """benchmarks/run.py as a module: its ``rebuild`` turns a result row back into a model."""
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_model(model_name: str, seed: int = 0):
    """The model's architecture with random weights, fp32 on the CPU (surgery runs there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = CONFIGS / f"{model_name}.json"
    if not config_path.exists():
        raise SystemExit(f"no config for {model_name!r} at {config_path}; write it with "
                         f"`python benchmarks/gpu_latency.py --write-configs` where the model is cached")
    config = AutoConfig.for_model(**json.loads(config_path.read_text()))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def write_configs(model_names: list[str]) -> None:
    for name in model_names:
        model, _ = models.load_model(name)
        config = model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            config.pop(key, None)
        CONFIGS.mkdir(exist_ok=True)
        (CONFIGS / f"{name}.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        print(f"wrote {CONFIGS / f'{name}.json'}")


def unaligned_control(plan: PrunePlan) -> PrunePlan:
    """``plan`` with one more FFN channel removed in every layer that keeps some, not re-aligned."""
    control = PrunePlan.from_dict(copy.deepcopy(plan.to_dict()))
    for layer in control.layers.values():
        if layer.ffn_channels:
            layer.ffn_channels = layer.ffn_channels[:-1]
    control.align = 1
    control.meta = {"name": "unaligned control"}
    return control


def variants_of(model_name: str, results_dir: Path, targets: list[float]) -> list[dict]:
    """Result rows to rebuild, in priority order, plus the alignment controls."""
    rows = []
    for suite in ("layer", "width"):
        path = results_dir / f"{suite}.json"
        if not path.exists():
            continue
        block = json.loads(path.read_text())["models"].get(model_name)
        for row in (block or {}).get("rows", []):
            if "error" in row or row["target"] not in targets:
                continue
            if "plan" not in row and not row.get("removed") and "tp_ratio" not in row:
                continue
            if "tp_ratio" in row and any(r["method"] == row["method"] and r.get("tp_ratio") == row["tp_ratio"]
                                         for r in rows):
                continue   # the TP recipe's row in both suites: one shape, timed once
            rows.append(dict(row, suite=suite))
    rows.sort(key=lambda r: (PRIORITY.index(r["target"]) if r["target"] in PRIORITY else len(PRIORITY),
                             r["suite"], r["method"]))
    width_80 = [r for r in rows if r["suite"] == "width" and r["target"] == 0.8 and "plan" in r
                and any(lp.get("ffn_channels") for lp in r["plan"]["layers"].values())]
    if width_80:
        best = min(width_80, key=lambda r: r["ppl"])
        control = unaligned_control(PrunePlan.from_dict(best["plan"]))
        rows.insert(0, dict(best, method=f"{best['method']} (unaligned control)", plan=control.to_dict(),
                            control_of=best["method"]))
    return rows


def shapes(model) -> dict:
    """Widths that decide the speed: blocks, attention heads, KV heads, FFN and hidden width."""
    heads = kv = ffn = blocks = 0
    for layer in model.model.layers:
        blocks += 1
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "q_proj"):
            heads += attn.q_proj.out_features // attn.head_dim
            kv += attn.k_proj.out_features // attn.head_dim
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "gate_proj"):
            ffn += mlp.gate_proj.out_features
    ffn_widths = sorted({layer.mlp.gate_proj.out_features for layer in model.model.layers
                         if hasattr(getattr(layer, "mlp", None), "gate_proj")})
    return {"blocks": blocks, "q_heads": heads, "kv_heads": kv, "ffn_total": ffn,
            "hidden": model.get_input_embeddings().weight.shape[1],
            "ffn_unaligned_layers": sum(1 for layer in model.model.layers
                                        if hasattr(getattr(layer, "mlp", None), "gate_proj")
                                        and layer.mlp.gate_proj.out_features % 8),
            "ffn_widths": ffn_widths if len(ffn_widths) <= 4 else f"{ffn_widths[0]}..{ffn_widths[-1]}"}


def time_model(model, args) -> dict:
    out = {}
    for regime, (batch, seq) in args.regimes.items():
        lat = evaluate.latency(model, batch_size=batch, seq_len=seq, decode_tokens=args.decode_tokens,
                               warmup=args.warmup, repeats=args.repeats, progress=False)
        out[f"{regime}_prefill_ms"] = round(lat["prefill_ms"], 3)
        out[f"{regime}_decode_ms"] = round(lat["decode_ms_per_token"], 3)
    return out


def on_device(model, args):
    dtype = getattr(torch, args.dtype)
    return model.to(device=args.device, dtype=dtype)


def run_model(model_name: str, args, harness, deadline: float) -> dict:
    base = random_model(model_name)
    dense = on_device(copy.deepcopy(base), args)
    block = {"dense": {"params": models.count_parameters(dense), **shapes(dense)}, "rows": []}
    first = time_model(dense, args)
    del dense
    calib = torch.randint(0, base.config.vocab_size, (10, 32))   # TP traces with it; its values are irrelevant
    for row in variants_of(model_name, args.source, args.targets):
        if time.perf_counter() > deadline:
            block["skipped_for_time"] = block.get("skipped_for_time", 0) + 1
            continue
        shape_row = dict(row, method=row["method"].replace("taylor-", ""))   # TP: L2 gives the same widths
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = harness.rebuild(shape_row, base, calib)
        model = on_device(model, args)
        entry = {"suite": row["suite"], "method": row["method"], "target": row["target"], "ppl": row["ppl"],
                 "params": models.count_parameters(model), **shapes(model), **time_model(model, args)}
        block["rows"].append(entry)
        print(f"{model_name} {entry['suite']} {entry['method']} {entry['target']:.0%}: "
              + " ".join(f"{k}={v}" for k, v in entry.items() if k.endswith("_ms")), flush=True)
        del model
        torch.cuda.empty_cache() if args.device == "cuda" else None
    dense = on_device(copy.deepcopy(base), args)
    last = time_model(dense, args)
    block["dense"].update({key: round((first[key] + last[key]) / 2, 3) for key in first})
    block["dense"]["drift"] = {key: round(last[key] / first[key] - 1, 4) for key in first}
    for entry in block["rows"]:
        entry["speedup"] = {key: round(block["dense"][key] / entry[key], 3) for key in first}
        entry["params_kept"] = round(entry["params"] / block["dense"]["params"], 4)
    return block


def write_markdown(result: dict, path: Path) -> None:
    regimes = result["regimes"]
    keys = [f"{r}_{p}_ms" for r in regimes for p in ("prefill", "decode")]
    lines = [f"# GPU latency of the benchmarked shapes: {result['gpu']}", "",
             f"`{result['command']}` — {result['dtype']}, torch {result['torch']}, transformers "
             f"{result['transformers']}, SDPA attention, stock `transformers` forward (no CUDA graphs, no "
             f"compile). Random weights in each row's exact shapes (see the script's docstring). "
             f"Prefill: one forward of batch x prompt tokens; decode: one cached step at that batch after the "
             f"prompt. Median of {result['repeats']} after {result['warmup']} warm-ups; speedup = dense / pruned "
             f"(dense timed before and after; drift shown). ppl: from the CPU quality benchmark.", ""]
    for model_name, block in result["models"].items():
        d = block["dense"]
        lines += [f"## {model_name}", "",
                  f"Dense: {d['params'] / 1e6:.1f}M params; "
                  + ", ".join(f"{k.removesuffix('_ms').replace('_', ' ')} {d[k]:.2f} ms" for k in keys)
                  + "; drift start->end " + ", ".join(f"{v:+.1%}" for v in d["drift"].values()) + ".", "",
                  "| target kept | suite | method | params kept | ppl | blocks | heads/KV | hidden | FFN widths | "
                  "unaligned FFN layers | " + " | ".join(f"prefill {r} | decode b{v['batch']}" for r, v in regimes.items())
                  + " |", "|---" * (10 + len(keys)) + "|"]
        for e in block["rows"]:
            s = e["speedup"]
            lines.append(f"| {e['target']:.0%} | {e['suite']} | {e['method']} | {e['params_kept']:.1%} | "
                         f"{e['ppl']:.4g} | {e['blocks']} | {e['q_heads']}/{e['kv_heads']} | {e['hidden']} | {e['ffn_widths']} | "
                         f"{e['ffn_unaligned_layers']} | " + " | ".join(f"x{s[k]:.2f}" for k in keys) + " |")
        if block.get("skipped_for_time"):
            lines.append(f"\n{block['skipped_for_time']} rows not timed (--budget-seconds spent).")
        slower = [e for e in block["rows"] if min(e["speedup"].values()) < 1.0]
        lines += ["", f"Rows slower than dense in some regime: {len(slower)} of {len(block['rows'])}"
                  + (" (" + "; ".join(f"{e['method']} {e['target']:.0%}: "
                                      + ", ".join(f"{k.removesuffix('_ms')} x{v:.2f}"
                                                  for k, v in e["speedup"].items() if v < 1.0)
                                      for e in slower) + ")" if slower else "") + ".", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--targets", default="0.9,0.8,0.7,0.5", help="fractions kept, comma-separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--regimes", default="1x128,16x512", help="batch x prompt tokens, comma-separated")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--budget-seconds", type=float, default=float("inf"),
                    help="stop starting new variants after this long (the dense re-timing and tables still run)")
    ap.add_argument("--source", type=Path, default=HERE / "results", help="folder of layer.json/width.json")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--write-configs", action="store_true",
                    help="write benchmarks/configs/<model>.json from the cached models, then stop")
    args = ap.parse_args(argv)
    model_names = args.models.split(",")
    if args.write_configs:
        write_configs(model_names)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU latency (use --device cpu to try it out)")
    args.targets = [float(t) for t in args.targets.split(",")]
    args.regimes = {r: tuple(int(n) for n in r.split("x")) for r in args.regimes.split(",")}
    import transformers

    harness = load_harness()
    deadline = time.perf_counter() + args.budget_seconds
    result = {"benchmark": "gpu_latency", "command": "python benchmarks/gpu_latency.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
              "warmup": args.warmup, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
              "regimes": {k: {"batch": b, "prompt": s} for k, (b, s) in args.regimes.items()}, "models": {}}
    args.results.mkdir(parents=True, exist_ok=True)
    for model_name in model_names:
        # split the remaining time between the models still to run
        share = (deadline - time.perf_counter()) / (len(model_names) - model_names.index(model_name))
        result["models"][model_name] = run_model(model_name, args, harness, time.perf_counter() + share)
        (args.results / "gpu_latency.json").write_text(json.dumps(result, indent=1) + "\n")
        write_markdown(result, args.results / "gpu_latency.md")
    print((args.results / "gpu_latency.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
