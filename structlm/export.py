"""Save a shrunk model as a checkpoint that loads with stock transformers, atomically.

* **uniform** models (every kept layer the same shape, no removed sublayers) are saved with the
  family's stock config and load with ``AutoModelForCausalLM.from_pretrained(path)``.  Llama
  shapes that ``LlamaConfig`` rejects (hidden % heads != 0, allowed with an explicit head_dim
  since it is only a check) are saved as ``mistral``, whose modeling is the same computation.
* **heterogeneous** models save the stock config plus a ``structlm`` layout (see
  :mod:`structlm.layout`) and ``modeling_structlm.py`` (the layout code and a subclass of the
  stock class) via ``auto_map``: they load with ``trust_remote_code=True`` without structlm,
  and with :func:`load` without remote code.
Saving is atomic (:class:`structlm.outputs.OutputFolder`: checked and locked before the work,
written into a staging folder beside the output, renamed into place) and every checkpoint gets
a ``README.md`` model card.  See docs/formats.md.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch

from . import layout as layout_module
from .families import get_adapter
from .outputs import OutputError, OutputFolder, describe_os_error

REMOTE_FILE = "modeling_structlm.py"
MODEL_CARD = "README.md"
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
    if info["placeholders"] or info.get("channel_maps"):   # removed sublayers, pruned head dims
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
    if info.get("channel_maps"):   # head dims pruned (qk/v channels): scatter/gather maps
        layout["channel_maps"] = info["channel_maps"]
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


def write_checkpoint(model, tokenizer, folder, *, plan=None, recipe: dict | None = None,
                     report: dict | None = None, name: str | None = None, weights=None) -> str:
    """Write the checkpoint (weights in the model's dtype, config, tokenizer, remote code for
    per-layer shapes, plan/recipe/report JSON and a README.md model card) into the existing
    folder ``folder``; return its format, "uniform" or "heterogeneous".  ``name`` is the
    output's folder name, used in the model card (default: ``folder``'s).  ``weights(folder,
    config)``: writes config and weights instead of ``save_pretrained`` (streaming mode, whose
    ``model`` is the shrunk model on the meta device and whose shards are already written)."""
    from safetensors import SafetensorError

    folder = Path(folder)
    config = stock_config(model)
    kind = "uniform" if config is not None else "heterogeneous"
    if config is None:
        config, _ = heterogeneous_config(model)
    try:
        original_config = model.config
        model.config = config
        try:
            if weights is not None:
                weights(folder, config)
            else:
                model.save_pretrained(folder)
        finally:
            model.config = original_config
        if kind == "heterogeneous":
            (folder / REMOTE_FILE).write_text(remote_code(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        report = {**(report or {}), "format": kind}
        if hasattr(plan, "save"):
            plan.save(folder)          # plan.json, and updates.safetensors beside it
        extras = {"plan": None if hasattr(plan, "save") else plan, "recipe": recipe, "report": report}
        for key, filename in FILES_BESIDE.items():
            if extras[key] is not None:
                (folder / filename).write_text(json.dumps(extras[key], indent=1, default=str) + "\n")
        card = model_card(kind, name or folder.name, recipe=recipe, report=report, plan=plan,
                          dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                          files=sorted(p.name for p in folder.iterdir()) + [MODEL_CARD])
        (folder / MODEL_CARD).write_text(card)
    except (OSError, SafetensorError) as e:  # SafetensorError wraps the OSError of a full disk
        cause = describe_os_error(e) if isinstance(e, OSError) else str(e)
        raise OutputError(f"could not write the checkpoint ({cause}); nothing was written to the output path") from None
    return kind


def save(model, tokenizer, out, *, plan=None, recipe: dict | None = None, report: dict | None = None,
         force: bool = False) -> Path:
    """Save ``model`` (in its dtype) and ``tokenizer`` as a checkpoint folder ``out``, atomically:
    ``out`` is either left as it was or complete.  A non-empty ``out`` is replaced only with
    ``force``; two processes saving to the same ``out`` never mix (see :class:`OutputFolder`)."""
    with OutputFolder(out, force) as output:
        write_checkpoint(model, tokenizer, output.staging, plan=plan, recipe=recipe, report=report,
                         name=Path(out).name)
        return output.commit()


# --------------------------------------------------------------------------------------------
# the model card (README.md, Hugging Face conventions: YAML front matter, then markdown)
# --------------------------------------------------------------------------------------------

FILE_ROLES = {
    "model.safetensors": "the weights",
    "model.safetensors.index.json": "which shard (model-0000k-of-0000N.safetensors) holds each tensor",
    "config.json": "the model config",
    REMOTE_FILE: "per-layer shapes for `trust_remote_code=True` (no structlm needed)",
    "plan.json": "what was removed, in dependency-graph units (docs/formats.md)",
    "updates.safetensors": "new values of kept weights (reconstruction), in the shrunk shapes; read with plan.json",
    "recipe.json": "how to redo it: method, target, options, calibration, command",
    "report.json": "parameters, before/after measurements, timings, the method's scores",
    "removed.png": "which blocks / sublayers were removed, in order of removal",
}


def _front_matter(fields: dict) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")  # a JSON string is a valid YAML scalar
    return "\n".join(lines + ["---", ""])


def removes_sublayers(plan) -> bool:
    """Whether ``plan`` removes whole blocks or attention/FFN sublayers (layer pruning)."""
    return bool(plan.removed_blocks) or any(not lp.attention or not lp.ffn for lp in plan.layers.values())


def _pruning_tags(plan) -> list[str]:
    if plan is None or not hasattr(plan, "layers"):
        return []
    tags = ["layer-pruning"] if removes_sublayers(plan) else []
    layers = plan.layers.values()
    if plan.hidden_channels is not None or any(
            lp.kv_groups is not None or lp.query_heads is not None or lp.ffn_channels is not None for lp in layers):
        tags.append("structured-pruning")
    return tags


def _results_table(report: dict) -> list[str]:
    stats, before, after = report.get("stats") or {}, report.get("before"), report.get("after")
    rows = []
    if "params_before" in stats:
        rows.append(("parameters", f"{stats['params_before'] / 1e6:.2f} M", f"{stats['params_after'] / 1e6:.2f} M"))
    if before and after and "perplexity" in before:
        b, a = before["perplexity"], after["perplexity"]
        rows.append((f"perplexity ({b['source']}, window {b['window']}, {b['tokens_scored']} tokens)",
                     f"{b['ppl']:.2f}", f"{a['ppl']:.2f}"))
    if before and after and "latency" in before:
        b, a = before["latency"], after["latency"]
        where = f"batch {b['batch']} x {b['seq_len']}, {b['device']}"
        rows.append((f"prefill ms ({where})", f"{b['prefill_ms']:.1f}", f"{a['prefill_ms']:.1f}"))
        rows.append((f"decode ms/token ({b['device']}, KV cache)", f"{b['decode_ms_per_token']:.2f}",
                     f"{a['decode_ms_per_token']:.2f}"))
    if not rows:
        return []
    lines = ["| | dense | pruned |", "|---|---|---|"] + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    if before:
        lines += ["", "Measured by structlm when the checkpoint was made: the dense and the pruned model "
                      "are the same loaded weights, in the same dtype, on the same text."]
    else:
        lines += ["", "No before/after evaluation was run (`--no-eval`); measure with `structlm eval`."]
    return lines


def model_card(kind: str, name: str, *, recipe: dict | None, report: dict | None, plan=None,
               dtype: str = "float32", files: list[str] = ()) -> str:
    """README.md for a checkpoint folder: front matter (base_model, tags, pipeline_tag,
    library_name, license where known), what was done, the numbers, how to load and redo it."""
    recipe, report = recipe or {}, report or {}
    base = recipe.get("base_model")
    method = recipe.get("method") or ("hand-written plan" if recipe.get("plan_file") else None)
    tags = ["structlm", "pruned"] + _pruning_tags(plan) + ([recipe["method"]] if recipe.get("method") else [])
    lines = [_front_matter({"base_model": base, "license": recipe.get("license"), "library_name": "transformers",
                            "pipeline_tag": "text-generation", "tags": tags})]
    source = base or recipe.get("model") or "a model"
    lines.append(f"# {name}\n")
    what = f"{source} pruned with structlm"
    if method:
        what += f" by {method}" + (f" at target `{recipe['target']}`" if recipe.get("target") else "")
    stats = report.get("stats") or {}
    if "params_kept" in stats:
        what += f": {stats['params_kept']:.1%} of the parameters kept"
    lines.append(what + f". Weights in {dtype}; " + (
        "every layer has the same shape, so it is a stock checkpoint." if kind == "uniform" else
        "layers have different shapes (per-layer widths or removed sublayers)."))
    if recipe.get("source"):
        lines.append(f"\nSource weights: {recipe['source']}.")
    table = _results_table(report)
    if table:
        lines += ["\n## Results\n"] + table
    lines += ["\n## How to load\n", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if kind == "uniform":
        lines.append(f'model = AutoModelForCausalLM.from_pretrained("{name}")  # this folder or its hub repo id')
    else:
        lines += [f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
                  f"# or, without remote code: import structlm; model = structlm.load(\"{name}\")"]
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```"]
    if kind == "heterogeneous":
        lines.append(f"\n`trust_remote_code=True` runs `{REMOTE_FILE}` from this folder: the stock "
                     f"transformers class with each layer resized to its saved shape; it needs no structlm.")
    if recipe:
        lines += ["\n## How it was made\n"]
        if recipe.get("command"):
            lines += ["```bash", recipe["command"], "```", ""]
        lines += ["The recipe (`recipe.json`):", "", "```json", json.dumps(recipe, indent=1, default=str), "```"]
    described = [f"- `{f}`: {FILE_ROLES[f]}" for f in files if f in FILE_ROLES]
    if described:
        lines += ["\n## Files\n"] + described
    return "\n".join(lines) + "\n"


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
