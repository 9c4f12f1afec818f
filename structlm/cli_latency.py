"""``structlm latency MODEL``: measure (or reuse) the latency table of MODEL's shape on this machine,
print it, optionally check it against end-to-end measurements (``--validate``) and write it where
``structlm prune --latency-table FILE`` can read it (on this machine or another)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_eval import add_common_model_args, int_at_least

DESCRIPTION = """\
Build the latency table of MODEL's shape for one regime: on random weights in the exact shapes
(from the config alone, no checkpoint needed), it times every attention configuration a plan can
give (KV groups x query heads per group, per layer kind), FFN widths on a grid (interpolated in
between; the error at off-grid widths is printed), removed sublayers and the fixed rest
(embedding, final norm, lm_head).  The table is cached per model shape, regime, hardware and
software under ~/.cache/structlm/latency (a second call reuses it) and written to --out FILE
when given.  prune's speedup= and latency_ms= targets are priced by it (docs/speed.md).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("latency", help="measure a latency table of a model shape on this machine",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_model_args(p)
    add_regime_args(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the timed weights and activations (default: float32)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="also write the table to FILE (JSON)")
    p.add_argument("--rebuild", action="store_true", help="measure again even when a cached table exists")
    p.add_argument("--validate", action="store_true",
                   help="also time the dense model and six pruned plans end to end and print predicted vs "
                        "measured latency and speedup")
    p.add_argument("--json", action="store_true", help="print the table as JSON instead of text")
    p.set_defaults(func=run)


REGIME_HELP = ("prefill: a [batch, seq] prompt, last position's logits; decode: one new token per sequence with a "
               "KV cache of seq tokens (default: prefill)")


def add_regime_args(p) -> None:
    p.add_argument("--regime", choices=("prefill", "decode"), default="prefill", help=REGIME_HELP)
    p.add_argument("--batch", type=int_at_least(1), default=1, help="batch size (default: 1)")
    p.add_argument("--seq", type=int_at_least(1), default=128,
                   help="prompt length (prefill) or KV-cache length (decode) (default: 128)")
    p.add_argument("--execution", choices=("eager", "cudagraph"), default="eager",
                   help="eager: stock forward calls (from_pretrained + generate); cudagraph (GPU only): the forward "
                        "captured once as a CUDA graph and replayed, as serving engines run small batches "
                        "(default: eager)")


def run(args) -> int:
    from . import models
    from .graph import build_graph
    from .latency import Regime, table_for
    from .latency.measure import check_regime_device

    models.set_threads(args.threads)
    regime = Regime.here(args.regime, args.batch, args.seq, device=args.device, dtype=args.dtype,
                         threads=args.threads, execution=args.execution)
    check_regime_device(regime)
    config = models.load_config(args.model)
    graph = build_graph(config)   # refuses, in one line, a family structlm cannot prune
    table, reused = table_for(graph, config, regime, rebuild=args.rebuild)
    if args.out:
        table.save(args.out)
    if args.json:
        sys.stdout.write(json.dumps(table.data, indent=1) + "\n")
    else:
        print(f"model: {args.model}")
        print(table.text())
        print(f"{'reused the cached table' if reused else 'measured and cached'}: {table.source}")
        if args.out:
            print(f"wrote {args.out}")
    if args.validate:
        from .latency.validate import validate_table, validation_text

        result = validate_table(table, config)
        print(validation_text(result))
        if args.out:
            table.data["validation"] = result
            table.save(args.out)
    return 0
