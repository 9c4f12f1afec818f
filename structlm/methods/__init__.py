"""Pruning methods, one file each, registered by name.

A method is a function ``method(model, graph, target, calib, **options) -> (PrunePlan, info)``:
it scores the graph's units on calibration data and returns a plan that meets ``target``
(plus a JSON-able ``info`` with its scores and decisions, written into the report).  It never
changes the model it returns a plan for (it may mask or skip parts temporarily).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_REGISTRY: dict[str, Callable] = {}
_BUILTIN = ("last_blocks", "shortgpt", "sleb", "finercut", "magnitude", "wanda_sp", "flap", "llm_pruner", "ziplm", "modegpt")


class MethodOptionError(ValueError):
    """An option a method does not take."""


def reject_unknown_options(method: str, unknown: dict, fn=None, *, error: type[ValueError] = MethodOptionError,
                           hint: str | None = None) -> None:
    """One clear error for options a method does not take, naming the ones it does (the keyword
    options of ``fn``) or where they are documented (``hint``)."""
    if not unknown:
        return
    if fn is not None:
        import inspect

        known = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        hint = f"{method} takes: {', '.join(known)}"
    raise error(f"{method}: unknown option(s) {', '.join(sorted(unknown))}" + (f"; {hint}" if hint else ""))


def register(name: str):
    def wrap(fn):
        _REGISTRY[name] = fn
        fn.method_name = name
        return fn
    return wrap


def _load_builtin():
    for module in _BUILTIN:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """The registered spelling of a method name: case and hyphens as papers write them are
    accepted ("LLM-Pruner", "Wanda-SP", "llm-pruner" -> "llm_pruner", "wanda_sp")."""
    return "_".join(str(name).strip().lower().replace("-", " ").replace("_", " ").split())


def get(name: str) -> Callable:
    _load_builtin()
    key = canonical_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(available()) or 'none'}")
    return _REGISTRY[key]
