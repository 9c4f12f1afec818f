"""``structlm graph MODEL``: the prunable coupled units of a model (from its config, no weights)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

FORMATS = ("text", "json", "dot")

DESCRIPTION = """\
Build the dependency graph of MODEL's prunable coupled units from its config alone (no weights are
loaded; parameters live on the meta device) and print it.

Unit kinds: query_head (q rows + o columns of one head), kv_group (one key/value head with its k/v
rows and all its query heads), ffn_channel (gate/up rows + down column, or fc1 row + fc2 column),
hidden_channel (one residual-stream channel across embeddings, every norm and projection, final
norm and lm_head), and the whole attention / ffn sublayers and blocks.

  text  readable summary: units per kind per layer, parameters and FLOPs/token per unit,
        totals and the parameter accounting (adds up to the model's parameter count)
  json  the full graph: every group with its member slices (see docs/graph.md)
  dot   Graphviz (render with: dot -Tsvg graph.dot -o graph.svg)
"""


def _describe_model_arg() -> str:
    try:
        from .models import describe_model_arg

        return describe_model_arg()
    except Exception:  # models.py missing or broken: keep the help usable
        return "a built-in alias, a local Hugging Face model folder or a .gguf file"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``graph`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "graph", help="show the prunable coupled units of a model (heads, KV groups, FFN/hidden channels, sublayers)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=f"the model: {_describe_model_arg()}")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    p.add_argument("--out", metavar="PATH", help="write to PATH instead of standard output")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Build and print the graph of ``args.model``; returns the exit status."""
    from .families import UnsupportedArchitectureError
    from .graph import GraphBuildError, build_graph

    fmt = getattr(args, "format", "text") or "text"
    try:
        from .models import load_config

        config = load_config(args.model)
    except (ValueError, OSError) as e:
        print(f"structlm graph: {e}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        graph = build_graph(config, per_layer_shapes=True)  # a pruned checkpoint: its real shapes
        seconds = time.perf_counter() - t0
    except (UnsupportedArchitectureError, GraphBuildError) as e:
        print(f"structlm graph: {e}", file=sys.stderr)
        return 2
    if fmt == "json":
        text = graph.to_json()
    elif fmt == "dot":
        text = graph.to_dot()
    else:
        text = f"model: {args.model}\n" + graph.summary_text() + f"(graph built in {seconds:.2f} s)\n"
    out = getattr(args, "out", None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"structlm graph: wrote {fmt} to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="structlm")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
