"""``structlm prune MODEL``: plan (by a method or from a file), shrink, save, evaluate before/after."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from . import __version__, data, methods, models
from .cli_eval import add_common_model_args, evaluate_model
from .plan import PrunePlan


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune", help="prune a model and save a smaller dense checkpoint",
        description="Prune MODEL by a method and a target, or by a hand-written plan (--plan), shrink the "
                    "tensors physically, save a checkpoint that loads with stock transformers into --out "
                    "(with plan.json, recipe.json and report.json beside it), and evaluate before/after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_model_args(p)
    how = p.add_argument_group("what to remove")
    how.add_argument("--plan", type=Path, help="a plan JSON file (format: docs/formats.md)")
    how.add_argument("--method", help=f"a pruning method: {', '.join(methods.available()) or 'none yet'}")
    how.add_argument("--target", help="params=0.8 keeps 80%% of parameters; blocks=N or sublayers=N removes N")
    how.add_argument("--align", type=int, default=None,
                     help="round kept FFN/hidden widths up to a multiple of N (default: the plan's, 8)")
    how.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a method option, repeatable: -O distance=kl -O screen_samples=16 (values read as "
                          "JSON where they parse: numbers, true/false, null; the options are in each method's "
                          "docs: docs/layer-methods.md, docs/width-methods.md)")
    how.add_argument("--dry-run", action="store_true", help="print the plan and its shapes, change nothing")
    cal = p.add_argument_group("calibration")
    cal.add_argument("--calib-data", default=data.BUILTIN, help="calibration text (see structlm eval --data)")
    cal.add_argument("--calib-samples", type=int, default=32, help="number of calibration samples")
    cal.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample")
    cal.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="output folder (required unless --dry-run)")
    out.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ev = p.add_argument_group("evaluation before/after")
    ev.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    ev.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens for perplexity")
    ev.add_argument("--seq-len", type=int, default=2048, help="perplexity window")
    ev.add_argument("--latency-seq", type=int, default=128, help="latency prompt length")
    from .methods._width import add_method_args  # width-method flags (--prune-hidden, --gqa, ...)

    add_method_args(p)
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.plan is None and not (args.method and args.target):
        raise ValueError("say what to remove: --plan PLAN.json, or --method METHOD --target params=0.8")
    if args.plan is not None and args.method:
        raise ValueError("give either --plan or --method/--target, not both")
    if not args.dry_run and args.out is None:
        raise ValueError("--out DIR is required (or use --dry-run)")
    if args.out is not None and not args.dry_run:
        from .export import check_output_path

        check_output_path(args.out, args.force)
    if args.option and not args.method:
        raise ValueError("-O/--option sets options of a --method; a --plan takes none")
    if args.method:
        from .targets import parse_target

        methods.get(args.method)
        parse_target(args.target)


def _table(before: dict | None, after: dict, stats: dict) -> str:
    rows = [("params", f"{stats['params_before'] / 1e6:.2f} M", f"{stats['params_after'] / 1e6:.2f} M",
             f"{stats['params_kept']:.1%}")]
    if before and "perplexity" in before:
        b, a = before["perplexity"]["ppl"], after["perplexity"]["ppl"]
        rows.append((f"ppl (w{before['perplexity']['window']}, {before['perplexity']['tokens_scored']} tok)",
                     f"{b:.2f}", f"{a:.2f}", f"x{a / b:.2f}"))
    if before and "latency" in before:
        for key, label in (("prefill_ms", "prefill ms"), ("decode_ms_per_token", "decode ms/token")):
            b, a = before["latency"][key], after["latency"][key]
            rows.append((label, f"{b:.1f}", f"{a:.1f}", f"speedup x{b / a:.2f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'':<{width}}  {'dense':>10}  {'pruned':>10}  ratio"]
    lines += [f"  {r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}  {r[3]}" for r in rows]
    return "\n".join(lines)


def parse_option(item: str) -> tuple[str, object]:
    """"KEY=VALUE" -> (key, value), the value read as JSON where it is JSON, else as text."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"-O {item!r}: write a method option as KEY=VALUE, e.g. -O screen_samples=16")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _method_options(args) -> dict:
    """The width-method flags plus every -O KEY=VALUE."""
    from .methods._width import method_options

    options = method_options(args)
    options.update(parse_option(item) for item in args.option)
    return options


def run(args) -> int:
    from . import export
    from .graph import build_graph
    from .pipeline import make_plan, prune

    _check_args(args)
    models.set_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = models.load_model(args.model)
    model.to(args.device)
    graph = build_graph(model)
    plan = PrunePlan.load(args.plan) if args.plan else None
    calib = None
    if plan is None:
        calib = data.calibration_samples(tokenizer, args.calib_samples, args.calib_len, source=args.calib_data,
                                         seed=args.seed).to(args.device)
    options = _method_options(args)
    plan, info, score_stats = make_plan(model, method=args.method, target=args.target, calib=calib, plan=plan,
                                        align=args.align, graph=graph, options=options)
    print(plan.summary_text(graph))
    if args.dry_run:
        return 0
    eval_kw = dict(ppl=True, latency=True, max_tokens=args.eval_tokens, seq_len=args.seq_len,
                   latency_seq=args.latency_seq)
    before = None if args.no_eval else evaluate_model(model, tokenizer, **eval_kw)
    result = prune(model, plan=plan)
    result.stats.update(score_stats)
    after = None if args.no_eval else evaluate_model(model, tokenizer, **eval_kw)
    recipe = {"structlm": __version__, "model": args.model, "method": args.method, "target": args.target,
              "options": options, "plan_file": str(args.plan) if args.plan else None, "align": plan.align,
              "calibration": None if args.plan else {"data": args.calib_data, "samples": args.calib_samples,
                                                       "tokens": args.calib_len, "seed": args.seed},
              "command": "structlm " + " ".join(sys.argv[1:]) if sys.argv and "structlm" in sys.argv[0] else None}
    report = {"model": args.model, "method": args.method or "plan", "target": args.target, "stats": result.stats,
              "shapes": plan.shapes(graph), "before": before, "after": after, "method_info": info,
              "environment": {"python": platform.python_version(), "platform": platform.platform()},
              "total_seconds": None}
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    export.save(model, tokenizer, args.out, plan=plan, recipe=recipe, report=report, force=args.force)
    if plan.removed_blocks or any(not lp.attention or not lp.ffn for lp in plan.layers.values()):
        from .figures import plot_removed
        plot_removed(plan, graph, args.out / "removed.png")  # removed sublayers/blocks, numbered by order
    print(_table(before, after or {}, result.stats) if before else
          f"  params {result.stats['params_before']:,} -> {result.stats['params_after']:,}")
    print(f"saved to {args.out} ({json.loads((args.out / 'report.json').read_text())['format']} checkpoint)")
    return 0
