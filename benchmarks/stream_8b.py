"""Streaming mode on a Llama-3-8B-shaped checkpoint (random bf16 weights, 16 GB) with bounded memory.

    .venv/bin/python benchmarks/stream_8b.py [--scratch /tmp/structlm-8b] [--method flap] [--target params=0.8]
                                             [--calib-samples 8] [--calib-len 256] [--threads 2] [--device cpu]

1. writes (once; reused when it is there) a sharded bf16 safetensors checkpoint of Llama-3-8B's
   config with random weights into ``--scratch``/model, one shard per decoder layer, generated
   tensor by tensor (the script itself never holds more than one layer); needs ~16 GB of disk for
   it and ~13 GB for the pruned output (``--scratch``/out, removed afterwards unless ``--keep``);
2. prunes it with ``structlm.streaming.stream_prune`` in a child process on random calibration ids
   and reads the child's peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), the wall time per
   layer in each pass (from the streaming observer) and in all, and extrapolates to the default
   calibration (32 x 256 tokens: pass 1's layer time is scaled by the tokens, the rest is kept);
3. builds Llama-3-70B's config on the meta device and times its graph, a plan and the plan's cost
   (no weights);
4. writes benchmarks/results/stream_8b.{json,md} with the command.

``--shape small`` runs the same on a 4-layer 256-wide model in seconds (a check of the script).
Random weights make the time and memory real and the perplexity meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # meta-llama/Meta-Llama-3-8B's config.json
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False),
}
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_checkpoint(folder: Path, shape: str, seed: int = 0) -> dict:
    """A random bf16 Llama checkpoint of ``shape``, one shard per layer (+ embeddings, + head)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], dtype="bfloat16")
    done = folder / "model.safetensors.index.json"
    if done.is_file():
        return json.loads((folder / "config.json").read_text())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name.split(".")[0] + (
            "-head" if name.startswith("lm_head") else "-rest")
        groups.setdefault(key, []).append(name)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, (key, names) in enumerate(groups.items()):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                t = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = (torch.randn(shapes[name], generator=g) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * 2
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {file} ({key})", flush=True)
    config.save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return json.loads((folder / "config.json").read_text())


def child(args) -> None:
    """The pruning run whose peak RSS is measured (a fresh process)."""
    import torch

    from structlm.models import set_threads
    from structlm.streaming import stream_prune

    set_threads(args.threads)
    config = json.loads((Path(args.scratch) / "model" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, config["vocab_size"], (args.calib_samples, args.calib_len), generator=g)
    marks: list[tuple[str, int | None, float]] = []
    start = time.perf_counter()
    result = stream_prune(Path(args.scratch) / "model", Path(args.scratch) / "out", method=args.method,
                          target=args.target, calib=calib, device=args.device, force=True,
                          observer=lambda stage, i, model: marks.append((stage, i, time.perf_counter())))
    end = time.perf_counter()
    per = {}
    for (stage, i, t), nxt in zip(marks, marks[1:] + [("end", None, end)]):
        per.setdefault(stage, []).append(round(nxt[2] - t, 3))
    out = {"seconds": round(end - start, 1), "per_layer_seconds": per, "stats": result.stats,
           "plan_params_ratio": result.plan.cost(result.graph)["params_ratio"],
           "output_bytes": sum(p.stat().st_size for p in (Path(args.scratch) / "out").iterdir())}
    Path(args.child_json).write_text(json.dumps(out, indent=1, default=str))


def meta_70b() -> dict:
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from structlm.graph import build_graph
    from structlm.pipeline import make_plan

    t0 = time.perf_counter()
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_70B, dtype="bfloat16"))
    t1 = time.perf_counter()
    graph = build_graph(model)
    t2 = time.perf_counter()
    plan, _, _ = make_plan(model, method="last_blocks", target="params=0.8", calib=torch.zeros(1, 1, dtype=torch.long),
                           graph=graph)
    cost = plan.cost(graph)
    t3 = time.perf_counter()
    return {"config": "Llama-3-70B", "params": graph.total_params, "meta_model_seconds": round(t1 - t0, 2),
            "graph_seconds": round(t2 - t1, 2), "plan_and_cost_seconds": round(t3 - t2, 2),
            "plan": "last_blocks params=0.8", "removed_blocks": plan.removed_blocks,
            "params_ratio": round(cost["params_ratio"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scratch", default="/tmp/structlm-8b")
    p.add_argument("--shape", choices=tuple(SHAPES), default="8b")
    p.add_argument("--method", default="flap")
    p.add_argument("--target", default="params=0.8")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true", help="keep the pruned output in SCRATCH/out")
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_json:
        return child(args)
    scratch = Path(args.scratch)
    print(f"checkpoint: {scratch / 'model'} ({args.shape})", flush=True)
    t0 = time.perf_counter()
    write_checkpoint(scratch / "model", args.shape)
    written = round(time.perf_counter() - t0, 1)
    child_json = scratch / "child.json"
    cmd = [sys.executable, __file__, "--child-json", str(child_json), "--scratch", str(scratch), "--shape",
           args.shape, "--method", args.method, "--target", args.target, "--calib-samples", str(args.calib_samples),
           "--calib-len", str(args.calib_len), "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = json.loads(child_json.read_text())
    tokens = args.calib_samples * args.calib_len
    pass1 = sum(run["per_layer_seconds"].get("score", []))
    pass2 = sum(run["per_layer_seconds"].get("shrink", [])) + sum(run["per_layer_seconds"].get("rest", []))
    ckpt_bytes = sum(f.stat().st_size for f in (scratch / "model").iterdir())
    result = {"shape": args.shape, "config": SHAPES[args.shape], "checkpoint_bytes": ckpt_bytes,
              "checkpoint_write_seconds": written, "method": args.method, "target": args.target,
              "calibration": [args.calib_samples, args.calib_len], "device": args.device, "threads": args.threads,
              "peak_rss_bytes": peak_kib * 1024, "wall_seconds": run["seconds"], "pass1_seconds": round(pass1, 1),
              "pass2_seconds": round(pass2, 1), "per_layer_seconds": run["per_layer_seconds"],
              "extrapolated_seconds_32x256": round(run["seconds"] - pass1 + pass1 * (32 * 256) / tokens, 1),
              "output_bytes": run["output_bytes"], "params_kept": run["stats"]["params_kept"],
              "llama_70b_on_meta": meta_70b(),
              "command": "python benchmarks/stream_8b.py " + shlex.join(sys.argv[1:]),
              "environment": {"python": platform.python_version(), "platform": platform.platform(),
                              "cpus": os.cpu_count()}}
    if not args.keep:
        shutil.rmtree(scratch / "out", ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    stem = "stream_8b" if args.shape == "8b" else f"stream_{args.shape}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    layers = run["per_layer_seconds"]
    md = [f"# Streaming mode, {args.shape} shape ({ckpt_bytes / 2**30:.1f} GiB bf16 checkpoint, random weights)", "",
          f"`{result['command']}`", "",
          "| | |", "|---|---|",
          f"| method, target | {args.method} {args.target} |",
          f"| calibration | {args.calib_samples} x {args.calib_len} tokens |",
          f"| device, threads | {args.device}, {args.threads} |",
          f"| peak RSS | {peak_kib / 2**20:.2f} GiB |",
          f"| wall time | {run['seconds']:.0f} s (pass 1 {pass1:.0f} s, pass 2 {pass2:.0f} s) |",
          f"| per layer, pass 1 (median) | {sorted(layers.get('score', [0]))[len(layers.get('score', [0])) // 2]:.1f} s |",
          f"| per layer, pass 2 (median) | {sorted(layers.get('shrink', [0]))[len(layers.get('shrink', [0])) // 2]:.1f} s |",
          f"| extrapolated to 32 x 256 calibration | {result['extrapolated_seconds_32x256']:.0f} s |",
          f"| params kept | {run['stats']['params_kept']:.3f} |",
          f"| Llama-3-70B on meta: graph, plan + cost | {result['llama_70b_on_meta']['graph_seconds']} s, "
          f"{result['llama_70b_on_meta']['plan_and_cost_seconds']} s |", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
