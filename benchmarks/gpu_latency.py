"""GPU latency of every benchmarked model shape against the dense model, on the GPU it runs on.

    python benchmarks/gpu_latency.py                       # all committed rows, both models
    python benchmarks/gpu_latency.py --models smollm2-135m --targets 0.8 --budget-seconds 300

Latency depends on the tensor shapes, not on the weight values. So every pruned model of the
committed quality benchmarks (benchmarks/results/{layer,width}.json) is rebuilt from its stored
plan on a randomly initialised model of the same config (benchmarks/configs/<model>.json):
no checkpoint, tokenizer or hub is needed on the GPU machine. Torch-Pruning rows are rebuilt with
their stored ratio and L2 importance: its recipe prunes every layer by the same ratio
(global_pruning=False), so its widths depend on the ratio alone, not on the importance.

One control per model shows what width alignment is worth: the best width plan at 80% kept with
one more FFN channel removed per layer and not re-aligned (align=1: widths like 1023 for 1024).

Each variant is timed with stock transformers in bf16 (SDPA attention, eager): the interactive
case (prefill of 1 x 128 tokens, then one cached decoding step at batch 1), where the host's
kernel launches dominate on a large GPU, and a compute-bound batch prefill (64 x 2048 tokens),
where the widths decide. Both prefills compute the last position's logits only, as generation
does. All variants of a model, dense included, are timed once per round over several rounds
(CUDA events) and the fastest round counts, so slow phases of the machine hit them alike.
Variants are built in priority order (80% kept first) until --budget-seconds are spent.
Writes benchmarks/results/gpu_latency.{json,md} (or --results).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
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


def load_config(model_name: str):
    """The model's config from benchmarks/configs/MODEL.json (or a path to such a .json file)."""
    from transformers import AutoConfig

    config_path = Path(model_name) if model_name.endswith(".json") else CONFIGS / f"{model_name}.json"
    if not config_path.exists():
        raise SystemExit(f"no config for {model_name!r} at {config_path}; write it with "
                         f"`python benchmarks/gpu_latency.py --write-configs` where the model is cached")
    return AutoConfig.for_model(**json.loads(config_path.read_text()))


def random_model(model_name: str, seed: int = 0):
    """The model's architecture with random weights, fp32 on the CPU (surgery runs there)."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_name)
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
    heads = kv = 0
    ffn = []   # the FFN width of every layer that still has an FFN
    for layer in model.model.layers:
        attn = getattr(layer, "self_attn", None)
        if hasattr(attn, "q_proj"):
            heads += attn.q_proj.out_features // attn.head_dim
            kv += attn.k_proj.out_features // attn.head_dim
        if hasattr(getattr(layer, "mlp", None), "gate_proj"):
            ffn.append(layer.mlp.gate_proj.out_features)
    widths = sorted(set(ffn))
    return {"blocks": len(model.model.layers), "q_heads": heads, "kv_heads": kv, "ffn_total": sum(ffn),
            "hidden": model.get_input_embeddings().weight.shape[1],
            "ffn_unaligned_layers": sum(1 for w in ffn if w % 8),
            "ffn_widths": widths if len(widths) <= 4 else f"{widths[0]}..{widths[-1]}"}


@torch.no_grad()
def time_once(model, batch: int, seq: int, decode_tokens: int) -> dict:
    """One timing of each: prefill of [batch, seq] computing the last position's logits only (as
    generation does) and, with decode_tokens > 0, the median cached decoding step after it."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    steps = torch.randint(0, vocab, (batch, max(decode_tokens, 1)), generator=generator).to(device)
    timed = evaluate._timer(device)
    state = {}

    def prefill():
        state["cache"] = model(input_ids=prompt, use_cache=decode_tokens > 0, logits_to_keep=1).cache

    out = {"prefill_ms": timed(prefill)}
    if decode_tokens:
        times = []
        for i in range(decode_tokens):
            def step(i=i):
                state["cache"] = model(input_ids=steps[:, i:i + 1], cache=state["cache"], use_cache=True).cache
            times.append(timed(step))
        out["decode_ms"] = statistics.median(times)
    return out


def time_round_robin(variants: dict, args) -> dict:
    """Every variant timed once per round, rounds repeated; the fastest of the rounds counts.
    Interleaving makes slow phases of the machine hit every variant alike; the minimum is the
    estimate least moved by them (host-side launch overhead dominates small-batch runs)."""
    runs = {name: {} for name in variants}
    for round_ in range(args.warmup + args.repeats):
        for name, model in variants.items():
            for regime, (batch, seq) in args.regimes.items():
                got = time_once(model, batch, seq, args.decode_tokens if batch <= args.decode_max_batch else 0)
                if round_ >= args.warmup:
                    for key, ms in got.items():
                        runs[name].setdefault(f"{regime}_{key.removesuffix('_ms')}_ms", []).append(ms)
    return {name: {key: round(min(times), 3) for key, times in got.items()} |
            {f"{key}_median": round(statistics.median(times), 3) for key, times in got.items()}
            for name, got in runs.items()}


def on_device(model, args):
    dtype = getattr(torch, args.dtype)
    return model.to(device=args.device, dtype=dtype)


def run_model(model_name: str, args, harness, deadline: float) -> dict:
    """Build every variant of one model (until the deadline), then time them all together."""
    base = random_model(model_name)
    variants = {"dense": on_device(copy.deepcopy(base), args)}
    block = {"dense": {"params": models.count_parameters(variants["dense"]), **shapes(variants["dense"])},
             "rows": []}
    calib = torch.randint(0, base.config.vocab_size, (10, 32))   # TP traces with it; its values are irrelevant
    for i, row in enumerate(variants_of(model_name, args.source, args.targets)):
        if time.perf_counter() > deadline:
            block["skipped_for_time"] = block.get("skipped_for_time", 0) + 1
            continue
        shape_row = dict(row, method=row["method"].replace("taylor-", ""))   # TP: L2 gives the same widths
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = on_device(harness.rebuild(shape_row, base, calib), args)
        variants[i] = model
        block["rows"].append({"variant": i, "suite": row["suite"], "method": row["method"], "target": row["target"],
                              "ppl": row["ppl"], "params": models.count_parameters(model), **shapes(model)})
    print(f"{model_name}: timing dense + {len(block['rows'])} variants, "
          f"{args.warmup} + {args.repeats} rounds", flush=True)
    timings = time_round_robin(variants, args)
    block["dense"].update(timings.pop("dense"))
    keys = [k for k in block["dense"] if k.endswith("_ms")]
    for entry in block["rows"]:
        entry.update(timings[entry.pop("variant")])
        entry["speedup"] = {key: round(block["dense"][key] / entry[key], 3) for key in keys}
        entry["params_kept"] = round(entry["params"] / block["dense"]["params"], 4)
    del variants
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return block


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# GPU latency of the benchmarked shapes: {result['gpu']}", "",
             f"`{result['command']}` — {result['dtype']}, torch {result['torch']}, transformers "
             f"{result['transformers']}, SDPA attention, stock `transformers` eager forward (no CUDA graphs, no "
             f"compile). Random weights in each row's exact shapes (see the script's docstring). Prefill: one "
             f"forward of batch x prompt tokens computing the last position's logits (as generation does); "
             f"decode: one cached step after that prompt (median of {result['decode_tokens']} steps). Every "
             f"variant of a model, dense included, is timed once per round; fastest of {result['repeats']} rounds "
             f"after {result['warmup']} warm-up rounds (median in the JSON). Speedup = dense time / pruned time. "
             f"ppl: from the CPU quality benchmark (`layer.md`, `width.md`).", ""]
    for model_name, block in result["models"].items():
        d = block["dense"]
        keys = [k for k in d if k.endswith("_ms")]
        names = [k.removesuffix("_ms").replace("_", " ") for k in keys]
        lines += [f"## {model_name}", "",
                  f"Dense: {d['params'] / 1e6:.1f}M params; " + ", ".join(f"{n} {d[k]:.2f} ms" for n, k in zip(names, keys))
                  + " (median over rounds: " + ", ".join(f"{d[k + '_median']:.2f}" for k in keys) + ").", "",
                  "| target kept | suite | method | params kept | ppl | blocks | heads/KV | hidden | FFN widths | "
                  "unaligned FFN layers | " + " | ".join(names) + " |", "|---" * (10 + len(keys)) + "|"]
        for e in block["rows"]:
            s = e["speedup"]
            lines.append(f"| {e['target']:.0%} | {e['suite']} | {e['method']} | {e['params_kept']:.1%} | "
                         f"{e['ppl']:.4g} | {e['blocks']} | {e['q_heads']}/{e['kv_heads']} | {e['hidden']} | "
                         f"{e['ffn_widths']} | {e['ffn_unaligned_layers']} | "
                         + " | ".join(f"x{s[k]:.2f}" for k in keys) + " |")
        if block.get("skipped_for_time"):
            lines.append(f"\n{block['skipped_for_time']} rows not timed (--budget-seconds spent).")
        slower = [e for e in block["rows"] if min(e["speedup"].values()) < 1.0]
        lines += ["", f"Rows slower than dense in some regime: {len(slower)} of {len(block['rows'])}"
                  + (" (" + "; ".join(f"{e['method']} {e['target']:.0%}: "
                                      + ", ".join(f"{k.removesuffix('_ms').replace('_', ' ')} x{v:.2f}"
                                                  for k, v in e["speedup"].items() if v < 1.0)
                                      for e in slower) + ")" if slower else "") + ".", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--targets", default="0.9,0.8,0.7,0.5", help="fractions kept, comma-separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--regimes", default="1x128,64x2048", help="batch x prompt tokens, comma-separated")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--decode-max-batch", type=int, default=1, help="decode is timed in regimes up to this batch")
    ap.add_argument("--budget-seconds", type=float, default=float("inf"),
                    help="stop building new variants after this long (those built are still timed)")
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
