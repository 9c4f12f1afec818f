"""``structlm eval MODEL``: perplexity, zero-shot accuracy, latency and size in one table."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import data, models

DEFAULT_TASKS = "arc_easy,piqa"


def add_common_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=models.describe_model_arg())
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $STRUCTLM_THREADS or torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model: perplexity, zero-shot accuracy, latency, size",
        description="Evaluate MODEL and print a table. With none of --ppl/--zero-shot/--latency, runs "
                    "--ppl and --latency. Parameters (tied embeddings counted once) are always reported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--ppl", action="store_true", help="held-out perplexity (non-overlapping windows)")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window length in tokens")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="use only the first N held-out tokens for perplexity (default: all)")
    p.add_argument("--data", default=data.BUILTIN,
                   help="held-out text: 'wikipedia' (built-in, last 42 articles), a .txt/.jsonl file, "
                        "a saved datasets folder or a datasets hub name")
    p.add_argument("--zero-shot", nargs="?", const=DEFAULT_TASKS, default=None, metavar="TASKS",
                   help="comma-separated zero-shot tasks (arc_easy, arc_challenge, piqa, hellaswag, "
                        f"winogrande, boolq, or 'all'); bare --zero-shot runs {DEFAULT_TASKS}")
    p.add_argument("--limit", type=int, default=None, help="first N items of each zero-shot task")
    p.add_argument("--latency", action="store_true",
                   help="prefill (batch x seq) and per-token decode latency with a KV cache")
    p.add_argument("--latency-batch", type=int, default=1, help="latency batch size")
    p.add_argument("--latency-seq", type=int, default=128, help="latency prompt length")
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def evaluate_model(model, tokenizer, *, ppl=True, zero_shot=None, latency=True, seq_len=2048,
                   max_tokens=None, source=data.BUILTIN, limit=None, batch_size=1, latency_batch=1,
                   latency_seq=128, folder=None) -> dict:
    """Run the requested evaluations on a loaded model; the Python twin of ``structlm eval``."""
    from . import evaluate

    results: dict = {"size": evaluate.model_size(model, folder)}
    if ppl:
        results["perplexity"] = evaluate.perplexity(model, tokenizer, seq_len=seq_len, max_tokens=max_tokens,
                                                    source=source, batch_size=batch_size)
    if zero_shot:
        from . import zeroshot

        tasks = list(zeroshot.TASKS) if zero_shot == "all" else [t.strip() for t in zero_shot.split(",") if t.strip()]
        results["zero_shot"] = zeroshot.evaluate_zero_shot(model, tokenizer, tasks, limit=limit)
    if latency:
        results["latency"] = evaluate.latency(model, batch_size=latency_batch, seq_len=latency_seq)
    return results


def format_table(results: dict, title: str = "") -> str:
    rows = [("params", f"{results['size']['params'] / 1e6:.2f} M")]
    if results["size"].get("bytes_on_disk"):
        rows.append(("size on disk", f"{results['size']['bytes_on_disk'] / 2**20:.1f} MiB"))
    if "perplexity" in results:
        p = results["perplexity"]
        rows.append(("perplexity", f"{p['ppl']:.3f}  (window {p['window']}, {p['windows']} windows, "
                                   f"{p['tokens_scored']} tokens, {p['source']})"))
    for task, r in results.get("zero_shot", {}).items():
        if task == "average":
            rows.append(("zero-shot avg", f"acc {r['average_acc']:.4f}  (paper metrics {r['average_paper']:.4f}, "
                                          f"{len(r['tasks'])} tasks)"))
        else:
            norm = f" / acc_norm {r['acc_norm']:.4f}" if r.get("acc_norm") is not None else ""
            rows.append((f"{task}", f"acc {r['acc']:.4f}{norm}  (n={r['n']})"))
    if "latency" in results:
        lat = results["latency"]
        rows.append(("prefill", f"{lat['prefill_ms']:.1f} ms  (batch {lat['batch']} x {lat['seq_len']} tokens)"))
        rows.append(("decode", f"{lat['decode_ms_per_token']:.2f} ms/token  (KV cache, {lat['device']})"))
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def run(args) -> int:
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive (got {args.max_tokens})")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive (got {args.limit})")
    models.set_threads(args.threads)
    want_default = not (args.ppl or args.zero_shot or args.latency)
    start = time.perf_counter()
    model, tokenizer = models.load_model(args.model)
    model.to(args.device)
    load_s = time.perf_counter() - start
    folder = models.weights_location(args.model)
    results = evaluate_model(
        model, tokenizer, ppl=args.ppl or want_default, zero_shot=args.zero_shot,
        latency=args.latency or want_default, seq_len=args.seq_len, max_tokens=args.max_tokens,
        source=args.data, limit=args.limit, batch_size=args.batch_size,
        latency_batch=args.latency_batch, latency_seq=args.latency_seq, folder=folder)
    results = {"model": args.model, "load_seconds": round(load_s, 2), **results}
    print(format_table(results, title=f"structlm eval {args.model}  (loaded in {load_s:.1f} s)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0
