"""``structlm study MODEL --out DIR``: an architecture-study report (report.md, report.html,
study.json, figures/) of what each block, sublayer, head and channel is worth by every criterion."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import data, models
from .cli_eval import add_common_model_args, check_context, int_at_least, load_model_arg

DESCRIPTION = """\
Score every block, sublayer, query head, KV group and FFN channel of MODEL with the pruning
methods' own criteria and write a report to --out DIR: report.md, a self-contained report.html
(figures embedded), study.json (every number) and figures/*.png.

criteria: bi (ShortGPT), angular (ShortGPT), sleb, finercut (one-at-a-time JS + the greedy order
for --steps steps), taylor (LLM-Pruner), wanda (Wanda-SP), flap, obs (ZipLM); 'layers' and 'width'
select groups.  With several --data sources every criterion is computed on each and compared.
--curves adds held-out perplexity against parameters removed (default methods: finercut, ziplm).
Finished parts are kept in DIR/parts: run the same command again to resume (same study.json).
"""


def register(subparsers) -> None:
    from .study.criteria import CRITERIA
    from .study.run import CURVE_METHODS, DEFAULT_CURVES, DEFAULTS

    p = subparsers.add_parser("study", help="architecture study: what each layer, sublayer, head and channel is worth",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_model_args(p)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created; resumed if it "
                                                                             "holds an earlier study)")
    p.add_argument("--data", default=data.BUILTIN, metavar="SRC[,SRC...]",
                   help="calibration sources: 'wikipedia' (built-in) and/or .txt/.jsonl files (default: wikipedia)")
    p.add_argument("--criteria", default="all", help=f"comma-separated: {', '.join(CRITERIA)}, or all / layers / "
                                                     f"width (default: all)")
    p.add_argument("--samples", "--budget", dest="samples", type=int_at_least(1), default=DEFAULTS["samples"],
                   help=f"calibration samples per source (default: {DEFAULTS['samples']}; FinerCut screens 8 of "
                        f"them, SLEB uses --sleb-samples, Taylor the first {DEFAULTS['taylor_samples']})")
    p.add_argument("--seq-len", type=int_at_least(2), default=DEFAULTS["seq_len"],
                   help=f"tokens per calibration sample (default: {DEFAULTS['seq_len']})")
    p.add_argument("--sleb-samples", type=int_at_least(1), default=DEFAULTS["sleb_samples"],
                   help=f"samples SLEB scores blocks on (default: {DEFAULTS['sleb_samples']})")
    p.add_argument("--steps", type=int_at_least(1), default=DEFAULTS["steps"], metavar="K",
                   help=f"greedy FinerCut removal steps (default: {DEFAULTS['steps']})")
    p.add_argument("--curves", nargs="?", const=",".join(DEFAULT_CURVES), default=None, metavar="METHODS",
                   help=f"add cost curves for these methods ({', '.join(CURVE_METHODS)}; "
                        f"default when given alone: {', '.join(DEFAULT_CURVES)})")
    p.add_argument("--curve-points", default=None, metavar="F[,F...]",
                   help="fractions of the parameters removed for the curves (default: 0.05,0.1,0.15,0.2)")
    p.add_argument("--eval-tokens", type=int_at_least(2), default=DEFAULTS["eval_tokens"],
                   help=f"held-out tokens per curve point (default: {DEFAULTS['eval_tokens']})")
    p.add_argument("--eval-seq-len", type=int_at_least(2), default=DEFAULTS["eval_seq_len"],
                   help=f"perplexity window of the curves (default: {DEFAULTS['eval_seq_len']})")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder that holds no study, and "
                                                        "recompute every part")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from .study.criteria import parse_criteria
    from .study.run import parse_curves, parse_points, parse_sources, prepare_out, study

    # refuse bad options before loading the model
    parse_criteria(args.criteria)
    sources = parse_sources(args.data)
    parse_curves(args.curves)
    parse_points(args.curve_points)
    for s in sources:
        if s != data.BUILTIN and not Path(s).expanduser().exists():
            raise data.DataError(f"--data {s!r}: no such file; give 'wikipedia' or existing .txt/.jsonl files")
    prepare_out(args.out, args.force)   # a folder that cannot hold the study is refused before the model loads
    models.set_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model_arg(args.model, args.device)
    lengths = {"--seq-len": args.seq_len}
    if args.curves:
        lengths["--eval-seq-len"] = args.eval_seq_len
    check_context(model, lengths)
    result = study(model, args.out, tokenizer=tokenizer, data=sources, criteria=args.criteria, samples=args.samples,
                   seq_len=args.seq_len, steps=args.steps, curves=args.curves, curve_points=args.curve_points,
                   force=args.force, progress=not args.quiet, model_name=args.model, seed=args.seed,
                   sleb_samples=args.sleb_samples, eval_tokens=args.eval_tokens, eval_seq_len=args.eval_seq_len)
    print("\n".join(f"- {f}" for f in result["findings"]))
    print(f"study of {args.model} written to {args.out}/ (report.md, report.html, study.json, "
          f"{len(result['figures'])} figures) in {time.perf_counter() - started:.0f} s")
    return 0
