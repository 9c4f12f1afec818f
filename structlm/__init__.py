"""structlm: structured and layer pruning for Hugging Face causal language models.

    import structlm
    model, tok = structlm.load_model("smollm2-135m")
    result = structlm.prune(model, plan=structlm.PrunePlan.load("plan.json"))
    structlm.save(result.model, tok, "out/pruned", plan=result.plan)
    again = structlm.load("out/pruned")
"""

__version__ = "0.1.0"

_LAZY = {
    "prune": ("pipeline", "prune"),
    "make_plan": ("pipeline", "make_plan"),
    "save": ("export", "save"),
    "load": ("export", "load"),
    "load_model": ("models", "load_model"),
    "build_graph": ("graph", "build_graph"),
    "PrunePlan": ("plan", "PrunePlan"),
    "LayerPlan": ("plan", "LayerPlan"),
    "mask": ("surgery", "mask"),
    "shrink": ("surgery", "shrink"),
    "study": ("study", "study"),
    "stream_prune": ("streaming", "stream_prune"),   # memory bounded by one decoder layer (docs/scale.md)   # the package is callable too (structlm/study/__init__.py)
}


def __getattr__(name):
    # heavy imports (torch, transformers) only when a name is used
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'structlm' has no attribute {name!r}")


__all__ = list(_LAZY)
