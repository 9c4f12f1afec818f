"""Golden graphs in ``graphs/``: one JSON file per family (from its tiny test config) and one per
real model (from its real config).  Regenerate on purpose with

    python -m structlm.graph.golden --update            # all of them
    python -m structlm.graph.golden --update llama opt  # some
    python -m structlm.graph.golden --check             # exit 1 and show a diff on any difference

(or ``STRUCTLM_UPDATE_GOLDEN=1 pytest tests/test_graph_golden.py``).  Real models need
``structlm.models.load_config``; ``--source gemma3-270m=/path/model.gguf`` reads a config from a
local file instead.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "graphs"
REAL_MODELS = ("smollm2-135m", "gemma3-270m")
UPDATE_CMD = "python -m structlm.graph.golden --update  (or STRUCTLM_UPDATE_GOLDEN=1 pytest tests/test_graph_golden.py)"


def tiny_families() -> tuple[str, ...]:
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import FAMILIES

    return FAMILIES


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def golden_names() -> list[str]:
    return list(tiny_families()) + list(REAL_MODELS)


def build_named(name: str, source: str | None = None):
    """The graph for golden file ``name``: a tiny family or a real model alias."""
    import logging

    from . import build_graph

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if name in tiny_families():
        from tiny_models import tiny_config

        return build_graph(tiny_config(name))
    from ..models import load_config

    return build_graph(load_config(source or name))


def render(name: str, source: str | None = None) -> str:
    return build_named(name, source).to_json()


def diff(name: str, text: str, context: int = 2, limit: int = 60) -> str:
    """Unified diff between the checked-in golden file and ``text`` ('' if equal)."""
    path = golden_path(name)
    old = path.read_text() if path.exists() else ""
    if old == text:
        return ""
    lines = list(difflib.unified_diff(old.splitlines(), text.splitlines(), f"graphs/{name}.json (checked in)",
                                      f"graphs/{name}.json (rebuilt)", n=context, lineterm=""))
    if not old:
        lines = [f"graphs/{name}.json does not exist"]
    return "\n".join(lines[:limit] + ([f"... {len(lines) - limit} more diff lines"] if len(lines) > limit else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m structlm.graph.golden", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--update", action="store_true", help="rewrite the golden files")
    mode.add_argument("--check", action="store_true", help="compare, print diffs, exit 1 on a difference")
    ap.add_argument("names", nargs="*", help=f"which (default: all): {', '.join(golden_names())}")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=MODEL",
                    help="read NAME's config from MODEL (a .gguf file or HF folder) instead of the alias")
    args = ap.parse_args(argv)
    sources = dict(s.split("=", 1) for s in args.source)
    names = args.names or golden_names()
    bad = 0
    for name in names:
        text = render(name, sources.get(name))
        d = diff(name, text)
        if args.update:
            if d:
                GOLDEN_DIR.mkdir(exist_ok=True)
                golden_path(name).write_text(text)
                print(f"updated graphs/{name}.json")
            else:
                print(f"unchanged graphs/{name}.json")
        elif d:
            bad += 1
            print(d)
        else:
            print(f"ok graphs/{name}.json")
    if bad:
        print(f"{bad} golden graph(s) differ; if the change is intended run: {UPDATE_CMD}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
