"""Family adapters: narrow, declarative answers about one architecture family.

An adapter says, from the transformers config and the model's parameter names, where the
pieces of a decoder block live (projections, norms, biases), where the embeddings, final
norm and lm_head are, and the numbers (heads, KV heads, head_dim, FFN width).  The graph
builder (:mod:`structlm.graph`) turns those answers into coupled units; adapters never
look at weights.  To add a family see ``docs/adding-a-family.md``.
"""

from __future__ import annotations

from .base import FamilyAdapter, Proj, UnsupportedArchitectureError

_REGISTRY: dict[str, type[FamilyAdapter]] = {}


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: make ``cls`` serve every ``model_type`` in ``cls.model_types``."""
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


_loaded = False


def _load_builtin() -> None:
    """Import every module of this package once: each adapter file registers itself."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def adapter_class(model_type: str) -> type[FamilyAdapter]:
    _load_builtin()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(model_type, sorted(_REGISTRY)) from None


def family_class(family: str) -> type[FamilyAdapter]:
    """The adapter class of a family name (``graph.family``), e.g. "gemma3"."""
    _load_builtin()
    for cls in _REGISTRY.values():
        if cls.family == family:
            return cls
    raise KeyError(f"no adapter for family {family!r}")


def get_adapter(config) -> FamilyAdapter:
    """The adapter instance for a transformers config (raises UnsupportedArchitectureError)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        # a multimodal Gemma3Config: structlm prunes the text model only
        raise UnsupportedArchitectureError(
            model_type, supported_model_types(),
            extra="Load the text-only model (Gemma3ForCausalLM, model_type 'gemma3_text').")
    return adapter_class(model_type)(config)


__all__ = ["FamilyAdapter", "Proj", "UnsupportedArchitectureError", "get_adapter", "register",
           "supported_model_types", "adapter_class"]
