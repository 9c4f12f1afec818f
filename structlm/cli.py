"""Command line: ``structlm <verb>``.  Each verb lives in its own module with a
``register(subparsers)`` function; this file only wires them, turns known errors into one clear
line on stderr, and turns SIGTERM into the clean-up path of Ctrl-C (outputs are staged and
removed on either, see :mod:`structlm.outputs`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from . import __version__

VERB_MODULES = ("structlm.cli_eval", "structlm.cli_graph", "structlm.cli_latency", "structlm.cli_prune",
                "structlm.cli_study")
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the problem and where the help is), no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same ``finally`` blocks clean up."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises :class:`Terminated` (once: a second SIGTERM during
    the clean-up is ignored; kill -9 still ends everything)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(
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
    from .outputs import OutputError
    from .study.criteria import StudyError

    # ValueError covers PlanError, TargetError, UnsupportedArchitectureError and GraphBuildError
    return AssetError, DataError, ModelNotFoundError, OutputError, StudyError, ValueError, FileExistsError, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    args.argv = argv  # the command as typed, for the recipe and the model card
    from . import distributed

    try:
        with sigterm_as_interrupt():
            if distributed.launched() and args.verb != "prune":
                raise ValueError(f"structlm {args.verb} does not run data-parallel; only structlm prune does "
                                 f"(docs/scale.md): run it without torchrun")
            return int(args.func(args) or 0)
    except known_errors() as e:
        distributed.report_error(f"structlm {args.verb}: error: {e}")
        return EXIT_ERROR
    except Terminated:
        other = distributed.peer_error()   # under torchrun, a rank that failed makes torchrun stop the others
        print(f"structlm: stopped because {other}; nothing half-written was left" if other else
              "structlm: terminated (SIGTERM); nothing half-written was left", file=distributed.error_stream())
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("structlm: interrupted; nothing half-written was left", file=distributed.error_stream())
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
