"""Command line: ``structlm <verb>``.  Each verb lives in its own module with a
``register(subparsers)`` function; this file only wires them and turns known errors into
one clear line on stderr."""

from __future__ import annotations

import argparse
import sys

from . import __version__

VERB_MODULES = ("structlm.cli_eval", "structlm.cli_graph", "structlm.cli_prune")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="structlm",
        description="Structured and layer pruning for Hugging Face causal language models. "
                    "MODEL arguments accept a built-in alias (smollm2-135m, gemma3-270m), a local "
                    "Hugging Face folder, a .gguf file, or a hub id where a hub is reachable.",
    )
    parser.add_argument("--version", action="version", version=f"structlm {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def known_errors() -> tuple[type[BaseException], ...]:
    from .assets import AssetError
    from .data import DataError
    from .models import ModelNotFoundError

    # ValueError covers PlanError, TargetError, UnsupportedArchitectureError and GraphBuildError
    return AssetError, DataError, ModelNotFoundError, ValueError, FileExistsError, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except known_errors() as e:
        print(f"structlm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("structlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
