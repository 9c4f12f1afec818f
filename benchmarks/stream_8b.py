"""Streaming mode on a Llama-3-8B-shaped checkpoint (random bf16 weights, 16 GB) with bounded memory.

    .venv/bin/python benchmarks/stream_8b.py [--scratch /tmp/structlm-8b] [--method flap] [--target params=0.8]
                                             [--calib-samples 8] [--calib-len 256] [--threads 2] [--device cpu]

1. writes (once; reused when it is there) a sharded bf16 safetensors checkpoint of Llama-3-8B's
   config with random weights into ``--scratch``/model, one shard per decoder layer, generated
   tensor by tensor (the script itself never holds more than one layer); needs ~16 GB of disk for
   it and ~13 GB for the pruned output (``--scratch``/out, removed afterwards unless ``--keep``);
2. prunes it with ``structlm.streaming.stream_prune`` in a child process on random calibration ids
   and reads the child's peak RSS and CPU time (``getrusage(RUSAGE_CHILDREN)``: ``ru_maxrss``,
   ``ru_utime + ru_stime``); per stage (one layer's work in each pass, from the streaming
   observer) the wall and CPU time, the time spent reading the checkpoint and the highest RSS
   sampled every 50 ms; and extrapolates to the default calibration (32 x 256 tokens: pass 1's
   layer time less its reads is scaled by the tokens, the rest is kept);
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


def _status_kib(key: str) -> int:
    """VmRSS / VmHWM of this process from /proc (KiB; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(args) -> None:
    """The pruning run whose peak RSS is measured (a fresh process).  Each stage (the interval
    between two observer calls: one layer's work and the next layer's read) gets its wall time,
    CPU time (user + sys of this process), the time spent reading the checkpoint, the highest RSS
    sampled during it (every 50 ms) and the process's RSS high-water mark at its end."""
    import threading

    import torch

    from structlm.models import set_threads
    from structlm.streaming import checkpoint as ckpt_module
    from structlm.streaming import stream_prune

    set_threads(args.threads)
    config = json.loads((Path(args.scratch) / "model" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, config["vocab_size"], (args.calib_samples, args.calib_len), generator=g)

    reading = [0.0]                 # seconds inside StreamingCheckpoint.load (reads + casts), cumulative
    load = ckpt_module.StreamingCheckpoint.load

    def timed_load(self, *a, **kw):
        t = time.perf_counter()
        try:
            return load(self, *a, **kw)
        finally:
            reading[0] += time.perf_counter() - t
    ckpt_module.StreamingCheckpoint.load = timed_load

    sampled = [0]                   # highest VmRSS sampled since the last mark
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            sampled[0] = max(sampled[0], _status_kib("VmRSS"))
    threading.Thread(target=sample, daemon=True).start()

    stages: list[dict] = []

    def mark(stage, i):
        now, cpu = time.perf_counter(), time.process_time()
        rss = _status_kib("VmRSS")
        if stages:
            last = stages[-1]
            last.update(seconds=round(now - last.pop("_t"), 3), cpu_seconds=round(cpu - last.pop("_cpu"), 3),
                        read_seconds=round(reading[0] - last.pop("_read"), 3),
                        peak_rss_mib=round(max(sampled[0], rss, last.pop("_rss")) / 1024, 1),
                        hwm_mib=round(_status_kib("VmHWM") / 1024, 1))
        sampled[0] = 0
        if stage is not None:
            stages.append({"stage": stage, "layer": i, "_t": now, "_cpu": cpu, "_read": reading[0], "_rss": rss})

    start, cpu0 = time.perf_counter(), time.process_time()
    mark("open+embed", None)        # the skeleton, the embedding's read and run, and layer 0's read
    result = stream_prune(Path(args.scratch) / "model", Path(args.scratch) / "out", method=args.method,
                          target=args.target, calib=calib, device=args.device, force=True,
                          observer=lambda stage, i, model: mark(stage, i))
    mark(None, None)
    stop.set()
    end = time.perf_counter()
    per: dict[str, list[float]] = {}
    for s in stages:
        per.setdefault(s["stage"], []).append(s["seconds"])
    out = {"seconds": round(end - start, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
           "per_layer_seconds": per, "stages": stages, "stats": result.stats,
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
    reused = (scratch / "model" / "model.safetensors.index.json").is_file()
    write_checkpoint(scratch / "model", args.shape)
    written = None if reused else round(time.perf_counter() - t0, 1)   # None: written by an earlier run
    child_json = scratch / "child.json"
    cmd = [sys.executable, __file__, "--child-json", str(child_json), "--scratch", str(scratch), "--shape",
           args.shape, "--method", args.method, "--target", args.target, "--calib-samples", str(args.calib_samples),
           "--calib-len", str(args.calib_len), "--threads", str(args.threads), "--device", args.device]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))   # the caller's packages too
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib, child_cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    run = json.loads(child_json.read_text())
    tokens = args.calib_samples * args.calib_len
    stages = run["stages"]
    one = [s for s in stages if s["stage"] in ("open+embed", "score")]
    two = [s for s in stages if s["stage"] in ("shrink", "rest")]

    def total(rows, key):
        return round(sum(r[key] for r in rows), 1)

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if values else 0.0

    pass1, pass2 = total(one, "seconds"), total(two, "seconds")
    # what grows with the calibration tokens: pass 1's layers less their checkpoint reads (the forward, the
    # statistics); the embedding lookup is negligible and open+embed is mostly building the skeleton
    score_rows = [s for s in one if s["stage"] == "score"]
    scaled = total(score_rows, "seconds") - total(score_rows, "read_seconds")
    scaled_cpu = total(score_rows, "cpu_seconds") - total(score_rows, "read_seconds")
    factor = (32 * 256) / tokens
    ckpt_bytes = sum(f.stat().st_size for f in (scratch / "model").iterdir())
    peaks = {}
    for s in stages:
        peaks[s["stage"]] = max(peaks.get(s["stage"], 0.0), s["peak_rss_mib"])
    hwm_stage = next((s for s in stages if s["hwm_mib"] >= stages[-1]["hwm_mib"]), stages[-1])
    result = {"shape": args.shape, "config": SHAPES[args.shape], "checkpoint_bytes": ckpt_bytes,
              "checkpoint_write_seconds": written, "method": args.method, "target": args.target,
              "calibration": [args.calib_samples, args.calib_len], "device": args.device, "threads": args.threads,
              "peak_rss_bytes": peak_kib * 1024,
              "peak_rss_mib_by_stage": peaks,
              "peak_reached_in": {"stage": hwm_stage["stage"], "layer": hwm_stage["layer"]},
              "wall_seconds": run["seconds"], "cpu_seconds": round(child_cpu, 1),
              "pass1_seconds": pass1, "pass2_seconds": pass2,
              "pass1_cpu_seconds": total(one, "cpu_seconds"), "pass2_cpu_seconds": total(two, "cpu_seconds"),
              "read_seconds": total(stages, "read_seconds"),
              "per_layer_seconds": run["per_layer_seconds"],
              "extrapolated_seconds_32x256": round(run["seconds"] + scaled * (factor - 1), 1),
              "extrapolated_cpu_seconds_32x256": round(child_cpu + scaled_cpu * (factor - 1), 1),
              "stages": stages,
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
    score = [s for s in stages if s["stage"] == "score"]
    shrunk = [s for s in stages if s["stage"] == "shrink"]
    meta = result["llama_70b_on_meta"]
    md = [f"# Streaming mode, {args.shape} shape ({ckpt_bytes / 2**30:.1f} GiB bf16 checkpoint, random weights)", "",
          f"`{result['command']}`", "",
          f"On {os.cpu_count()} CPU cores shared with other jobs: wall times are inflated by whatever else ran; "
          f"the CPU time (user + sys of the pruning process) is the steadier figure. Random weights make the "
          f"time and memory real and the plan meaningless.", "",
          "| | |", "|---|---|",
          f"| method, target | {args.method} {args.target} |",
          f"| calibration | {args.calib_samples} x {args.calib_len} tokens |",
          f"| device, threads | {args.device}, {args.threads} |",
          f"| peak RSS (whole pruning process) | {peak_kib / 2**20:.2f} GiB (reached in: {hwm_stage['stage']}"
          f"{'' if hwm_stage['layer'] is None else ' layer ' + str(hwm_stage['layer'])}) |",
          f"| wall time | {run['seconds']:.0f} s (pass 1 {pass1:.0f} s, pass 2 {pass2:.0f} s) |",
          f"| CPU time (user + sys) | {child_cpu:.0f} s (pass 1 {result['pass1_cpu_seconds']:.0f} s, "
          f"pass 2 {result['pass2_cpu_seconds']:.0f} s) |",
          f"| of which reading the checkpoint (wall) | {result['read_seconds']:.0f} s |",
          f"| per layer, pass 1: wall / CPU (median) | {median([s['seconds'] for s in score]):.1f} s / "
          f"{median([s['cpu_seconds'] for s in score]):.1f} s |",
          f"| per layer, pass 2: wall / CPU (median) | {median([s['seconds'] for s in shrunk]):.1f} s / "
          f"{median([s['cpu_seconds'] for s in shrunk]):.1f} s |",
          f"| extrapolated to 32 x 256 calibration: wall / CPU | {result['extrapolated_seconds_32x256']:.0f} s / "
          f"{result['extrapolated_cpu_seconds_32x256']:.0f} s |",
          f"| params kept | {run['stats']['params_kept']:.3f} |",
          f"| output | {run['output_bytes'] / 2**30:.2f} GiB |",
          f"| Llama-3-70B on meta ({meta['params'] / 1e9:.1f} B params): meta model, graph, plan + cost "
          f"| {meta['meta_model_seconds']} s, {meta['graph_seconds']} s, {meta['plan_and_cost_seconds']} s "
          f"({meta['plan']}: {len(meta['removed_blocks'])} blocks removed, params ratio {meta['params_ratio']}) |", "",
          "Peak RSS by stage (MiB; the highest RSS sampled every 50 ms during any stage of that kind):", "",
          "| stage | peak RSS |", "|---|---|",
          *[f"| {k} | {v:.0f} |" for k, v in peaks.items()], "",
          "The extrapolation scales pass 1's layer stages without their checkpoint reads (the forward and the statistics grow "
          "with the calibration tokens) by (32 x 256) / tokens and keeps the rest. Per-layer figures for every "
          "stage (wall, CPU, read, RSS) are in the JSON file beside this one.", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
