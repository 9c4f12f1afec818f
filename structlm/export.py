"""Save a shrunk model as a checkpoint that loads with stock transformers, atomically.

* **uniform** models (every kept layer the same shape, no removed sublayers) are saved with the
  family's stock config and load with ``AutoModelForCausalLM.from_pretrained(path)``.  Llama
  shapes that ``LlamaConfig`` rejects (hidden % heads != 0, allowed with an explicit head_dim
  since it is only a check) are saved as ``mistral``, whose modeling is the same computation.
* **heterogeneous** models save the stock config plus a ``structlm`` layout (see
  :mod:`structlm.layout`) and ``modeling_structlm.py`` (the layout code and a subclass of the
  stock class) via ``auto_map``: they load with ``trust_remote_code=True`` without structlm,
  and with :func:`load` without remote code.
See docs/formats.md.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import layout as layout_module
from .families import get_adapter

REMOTE_FILE = "modeling_structlm.py"
FILES_BESIDE = {"plan": "plan.json", "recipe": "recipe.json", "report": "report.json"}


def _config_fields(adapter, heads: int, kv_heads: int, ffn: int) -> dict:
    """The family's config fields for uniform per-layer shapes."""
    if adapter.family == "gpt2":
        return {"n_head": heads, "n_inner": ffn}
    if adapter.family == "opt":
        return {"num_attention_heads": heads, "ffn_dim": ffn}
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": ffn,
            "head_dim": adapter.head_dim}


def _config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type")
    return AutoConfig.for_model(model_type, **d)


def _meta_shapes(config, placeholders: dict | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    layout_module.apply_layout(model, {"placeholders": placeholders or {}})
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _shapes(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def stock_config(model):
    """A stock config that rebuilds exactly this model's shapes, or None."""
    info = getattr(model, "structlm_layout", None)
    if info is None:
        return model.config
    if info["placeholders"]:
        return None
    shapes = {(r["heads"], r["kv_heads"], r["ffn"]) for r in info["layers"]}
    if len(shapes) != 1:
        return None
    heads, kv_heads, ffn = shapes.pop()
    adapter = get_adapter(model.config)
    d = model.config.to_dict()
    d.update(_config_fields(adapter, heads, kv_heads, ffn))
    d.pop("structlm", None)
    d.pop("auto_map", None)
    candidates = [d]
    if d["model_type"] == "llama" and not d.get("attention_bias") and not d.get("mlp_bias"):
        mistral = {k: v for k, v in d.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
        mistral.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
        candidates.append(mistral)
    target = _shapes(model)
    for candidate in candidates:
        try:
            config = _config_from_dict(candidate)
            if _meta_shapes(config) == target:
                return config
        except Exception:  # the stock config or model rejects the shape: not expressible
            continue
    return None


def heterogeneous_config(model) -> tuple[object, dict]:
    """The stock config with a ``structlm`` layout and ``auto_map``; also the layout."""
    info = model.structlm_layout
    d = model.config.to_dict()
    d.pop("structlm", None)
    base = _config_from_dict(d)
    stock = _meta_shapes(base, info["placeholders"])
    target = _shapes(model)
    if set(stock) != set(target):
        missing = sorted(set(stock) ^ set(target))[:5]
        raise RuntimeError(f"cannot describe the shrunk model as a layout over the stock class: "
                           f"parameters {missing} differ in name")
    layout = {"version": 1, "family": info["family"], "layers": info["layers"],
              "placeholders": info["placeholders"], "module_attrs": info["module_attrs"],
              "param_shapes": {n: list(s) for n, s in target.items() if stock[n] != s}}
    base.structlm = layout
    base.auto_map = {"AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.{_remote_class_name(model)}"}
    return base, layout


def _stock_class(config):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)] if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING \
        else AutoModelForCausalLM._model_mapping[type(config)]


def _remote_class_name(model) -> str:
    return "Structlm" + _stock_class(model.config).__name__


def remote_code(model) -> str:
    """modeling_structlm.py: the layout code plus a subclass of the stock class."""
    base = _stock_class(model.config)
    name = _remote_class_name(model)
    return (inspect.getsource(layout_module)
            + f"\n\nfrom {base.__module__} import {base.__name__}\n\n\n"
            f"class {name}({base.__name__}):\n"
            f'    """{base.__name__} with per-layer shapes from ``config.structlm`` (written by structlm)."""\n\n'
            f"    def __init__(self, config):\n"
            f"        super().__init__(config)\n"
            f"        apply_layout(self, getattr(config, 'structlm', None))\n")


def check_output_path(out: Path, force: bool) -> None:
    """Refuse a non-empty output path unless ``force`` (checked before any work, and again on save)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"output path {out} exists and is not empty; choose another path or pass "
                                  f"--force (force=True) to replace it")


def save(model, tokenizer, out, *, plan=None, recipe: dict | None = None, report: dict | None = None,
         force: bool = False) -> Path:
    """Write the checkpoint into a temporary folder beside ``out`` and rename it into place,
    so that ``out`` is either absent/untouched or complete."""
    out = Path(out)
    check_output_path(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = stock_config(model)
    kind = "uniform" if config is not None else "heterogeneous"
    if config is None:
        config, _ = heterogeneous_config(model)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        original_config = model.config
        model.config = config
        try:
            model.save_pretrained(staging)
        finally:
            model.config = original_config
        if kind == "heterogeneous":
            (staging / REMOTE_FILE).write_text(remote_code(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        extras = {"plan": plan.to_dict() if hasattr(plan, "to_dict") else plan, "recipe": recipe,
                  "report": {**(report or {}), "format": kind}}
        for key, filename in FILES_BESIDE.items():
            if extras[key] is not None:
                (staging / filename).write_text(json.dumps(extras[key], indent=1, default=str) + "\n")
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace(staging: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def load(path, dtype=torch.float32):
    """Load a structlm checkpoint (uniform or heterogeneous) without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    layout = getattr(config, "structlm", None)
    if not layout:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    config = copy.deepcopy(config)
    config.auto_map = None
    base = _stock_class(config)

    def __init__(self, cfg):
        base.__init__(self, cfg)
        layout_module.apply_layout(self, getattr(cfg, "structlm", None))

    cls = type("Structlm" + base.__name__, (base,), {"__init__": __init__})
    return cls.from_pretrained(path, config=config, dtype=dtype).eval()
