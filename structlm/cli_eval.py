"""``structlm eval MODEL``: perplexity, zero-shot accuracy, latency and size in one table."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import data, models

DEFAULT_TASKS = "arc_easy,piqa"
LATENCY_DECODE_TOKENS = 32  # decoding steps timed after the latency prompt (they count towards the context)


def int_at_least(minimum: int, why: str = ""):
    """An argparse type: a whole number >= ``minimum``, refused with the reason otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why} (got {value})")
        return value
    parse.__name__ = "whole number"
    return parse


def torch_device(name: str) -> str:
    """An argparse type: a torch device that exists here (``cuda`` only where CUDA is available)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{name}: CUDA is not available here (torch {torch.__version__}"
                f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{name}: there are only {torch.cuda.device_count()} CUDA devices "
                                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{name}: Apple MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise argparse.ArgumentTypeError(f"{name}: the {device.type} backend is not available here; "
                                             f"use --device cpu")
    return name


def add_common_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=models.describe_model_arg())
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: $STRUCTLM_THREADS or torch's default)")
    parser.add_argument("--device", type=torch_device, default="cpu",
                        help="torch device, e.g. cpu or cuda (default: cpu)")


def load_model_arg(name: str, device: str = "cpu"):
    """Load MODEL for a verb, refusing fast what would fail slowly: a hub id when no hub is
    reachable, an empty or truncated .gguf file."""
    from . import assets

    kind, info = models.resolve(name)
    if kind == "hub":
        assets.require_hub(f"MODEL {name!r}")
    if kind == "gguf":
        assets.check_gguf(Path(info["dir"]) / info["file"])
    model, tokenizer = models.load_model(name)
    model.to(device)
    return model, tokenizer


def context_length(model) -> int | None:
    """The longest sequence the model's positions allow (config max_position_embeddings)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def check_context(model, lengths: dict[str, int]) -> None:
    """Refuse token lengths (keyed by the flag that set them) above the model's context, before
    any work: such runs either crash (learned positions) or take many minutes for nothing."""
    limit = context_length(model)
    for flag, n in lengths.items():
        if limit and n > limit:
            raise ValueError(f"{flag} asks for {n} tokens, more than the model's context of {limit} "
                             f"(max_position_embeddings); use at most {limit}")


def eval_lengths(*, ppl: bool, latency: bool, seq_len: int, latency_seq: int) -> dict[str, int]:
    """The token lengths an evaluation will use, keyed by flag, for :func:`check_context`."""
    lengths = {}
    if ppl:
        lengths["--seq-len"] = seq_len
    if latency:
        lengths[f"--latency-seq (plus {LATENCY_DECODE_TOKENS} decoded tokens)"] = latency_seq + LATENCY_DECODE_TOKENS
    return lengths


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model: perplexity, zero-shot accuracy, latency, size",
        description="Evaluate MODEL and print a table. With none of --ppl/--zero-shot/--latency, runs "
                    "--ppl and --latency. Parameters (tied embeddings counted once) are always reported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--ppl", action="store_true", help="held-out perplexity (non-overlapping windows)")
    p.add_argument("--seq-len", type=int_at_least(2, ": a window predicts its tokens from the second on"),
                   default=2048, help="perplexity window length in tokens")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None,
                   help="use only the first N held-out tokens for perplexity (default: all)")
    p.add_argument("--data", default=data.BUILTIN,
                   help="held-out text: 'wikipedia' (built-in, last 42 articles), a .txt/.jsonl file, "
                        "a saved datasets folder or a datasets hub name")
    p.add_argument("--zero-shot", nargs="?", const=DEFAULT_TASKS, default=None, metavar="TASKS",
                   help="comma-separated zero-shot tasks (arc_easy, arc_challenge, piqa, hellaswag, "
                        f"winogrande, boolq, or 'all'); bare --zero-shot runs {DEFAULT_TASKS}")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="first N items of each zero-shot task")
    p.add_argument("--latency", action="store_true",
                   help="prefill (batch x seq) and per-token decode latency with a KV cache")
    p.add_argument("--latency-batch", type=int_at_least(1), default=1, help="latency batch size")
    p.add_argument("--latency-seq", type=int_at_least(1), default=128, help="latency prompt length")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="perplexity windows per forward")
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
        results["latency"] = evaluate.latency(model, batch_size=latency_batch, seq_len=latency_seq,
                                              decode_tokens=LATENCY_DECODE_TOKENS)
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
    from .outputs import check_writable_file, write_output_file

    if args.json:
        check_writable_file(args.json, "--json")  # before the work, not after it
    if args.zero_shot and args.zero_shot != "all":
        from .zeroshot import check_tasks

        check_tasks([t.strip() for t in args.zero_shot.split(",") if t.strip()])
    models.set_threads(args.threads)
    want_default = not (args.ppl or args.zero_shot or args.latency)
    ppl, latency = args.ppl or want_default, args.latency or want_default
    start = time.perf_counter()
    model, tokenizer = load_model_arg(args.model, args.device)
    load_s = time.perf_counter() - start
    check_context(model, eval_lengths(ppl=ppl, latency=latency, seq_len=args.seq_len, latency_seq=args.latency_seq))
    folder = models.weights_location(args.model)
    results = evaluate_model(
        model, tokenizer, ppl=ppl, zero_shot=args.zero_shot,
        latency=latency, seq_len=args.seq_len, max_tokens=args.max_tokens,
        source=args.data, limit=args.limit, batch_size=args.batch_size,
        latency_batch=args.latency_batch, latency_seq=args.latency_seq, folder=folder)
    results = {"model": args.model, "load_seconds": round(load_s, 2), **results}
    print(format_table(results, title=f"structlm eval {args.model}  (loaded in {load_s:.1f} s)"))
    if args.json:
        write_output_file(args.json, (json.dumps(results, indent=2) + "\n").encode(), "--json")
        print(f"results written to {args.json}")
    return 0
