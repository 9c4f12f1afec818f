"""Torch-Pruning (the anchor), run from its pip package the way its own LLM example does.

Torch-Pruning 1.6.1's ``examples/LLMs/prune_llm.py`` prunes attention heads, FFN channels and
hidden channels of a Llama-style model with ``MetaPruner`` (L2 group magnitude, mean over the
group, one ratio for channels and heads, ``round_to=4``, lm_head ignored).  :func:`tp_prune`
reproduces that recipe, optionally with Taylor importance (``GroupTaylorImportance`` after a
backward pass on calibration data) and with the hidden size kept (embeddings, o_proj and
down_proj ignored), and patches two known traps of TP 1.6.1 with torch 2.13 / transformers 5:

* autograd reports ``torch.cat``/``split`` dims as unsigned (2**64-1 for dim=-1) and TP loops
  forever on RoPE's ``cat(dim=-1)`` (TP issue #527): a dim >= 2**63 is read as negative;
* with SDPA, transformers passes ``enable_gqa=True`` and skips ``repeat_kv``, so TP cannot map
  GQA heads (#516): the model is traced with eager attention.

Used by the benchmarks to compare side by side in the same run; not part of structlm's methods.
"""

from __future__ import annotations

import torch

_BIG = 2**63


def patch_torch_pruning() -> None:
    """Make TP's DependencyGraph read autograd's unsigned dims as the negative dims they are."""
    from torch_pruning.dependency import graph as tpg

    if getattr(tpg.DependencyGraph, "_structlm_patched", False):
        return

    class GradFnView:
        """A grad_fn whose unsigned ``_saved_dim`` reads as the negative dim it is."""

        def __init__(self, grad_fn):
            object.__setattr__(self, "_gf", grad_fn)

        def __getattr__(self, name):
            value = getattr(self._gf, name)
            if name == "_saved_dim" and isinstance(value, int) and value >= _BIG:
                value -= 2**64
            return value

        def __hash__(self):
            return hash(self._gf)

        def __eq__(self, other):
            return self._gf is getattr(other, "_gf", other)

    original = tpg.DependencyGraph._build_dependency

    def build(self, module2node):
        for node in module2node.values():
            grad_fn = node.grad_fn
            dim = getattr(grad_fn, "_saved_dim", None) if grad_fn is not None else None
            if isinstance(dim, int) and dim >= _BIG:
                node.grad_fn = GradFnView(grad_fn)
            module = node.module
            if isinstance(getattr(module, "dim", None), int) and module.dim >= _BIG:
                module.dim -= 2**64
        return original(self, module2node)

    tpg.DependencyGraph._build_dependency = build
    tpg.DependencyGraph._structlm_patched = True


def _set_attention_implementation(model, impl: str) -> None:
    for module in model.modules():   # the model itself and every submodule holding a config
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = impl


def tp_prune(model, ratio: float, *, importance: str = "l2", calib: torch.Tensor | None = None,
             prune_hidden: bool = True, round_to: int = 4):
    """Prune a Llama-style ``model`` in place with Torch-Pruning's LLM recipe; returns the model.

    ``importance``: "l2" (the recipe's GroupMagnitudeImportance p=2, mean) or "taylor"
    (GroupTaylorImportance; needs ``calib`` token ids [N, L] for the backward pass)."""
    import torch_pruning as tp

    patch_torch_pruning()
    config = model.config
    attn_impl = model.config._attn_implementation
    _set_attention_implementation(model, "eager")   # traced with eager attention (see above)
    example = (calib[:1, :32] if calib is not None else torch.arange(1, 17)[None]).to(model.device)
    num_heads, ignored = {}, [model.lm_head]
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
            if not prune_hidden:
                ignored.append(module.o_proj)
        if name.endswith("mlp") and not prune_hidden:
            ignored.append(module.down_proj)
    if not prune_hidden:
        ignored.append(model.get_input_embeddings())
    if importance == "l2":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"unknown Torch-Pruning importance {importance!r}; use 'l2' or 'taylor'")
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=imp, global_pruning=False, pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, round_to=round_to,
        forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits)
    if importance == "taylor":
        if calib is None:
            raise ValueError("Taylor importance needs calibration token ids")
        model.zero_grad()
        with torch.enable_grad():
            for row in calib:
                model(input_ids=row[None], labels=row[None], use_cache=False).loss.backward()
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    # the recipe's attribute fix-up after pruning
    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            heads = module.q_proj.out_features // module.head_dim
            kv_heads = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = heads // kv_heads
            config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
        elif name.endswith("mlp"):
            config.intermediate_size = module.gate_proj.out_features
    _set_attention_implementation(model, attn_impl)   # run as the dense model runs (e.g. SDPA): fair timings
    return model.eval()


def tp_prune_to_params(model_factory, params_keep: float, *, importance: str = "l2", calib=None,
                       prune_hidden: bool = True, tolerance: float = 0.005, max_iter: int = 8):
    """Search TP's ratio so that the pruned model keeps ``params_keep`` of the parameters
    (within ``tolerance``); ``model_factory()`` returns a fresh dense model for each try.
    The kept fraction falls monotonically and smoothly with the ratio, so the search interpolates
    inside a bracket (regula falsi, kept a little inside it): 2-4 TP runs instead of bisection's 6-8.
    Returns (model, ratio, kept fraction)."""
    from .models import count_parameters

    dense = count_parameters(model_factory())
    lo, kept_lo = 0.0, 1.0          # ratio 0 keeps everything
    hi, kept_hi = None, None
    ratio = 1.0 - params_keep       # first guess: kept falls linearly with the ratio
    best = None
    for _ in range(max_iter):
        model = tp_prune(model_factory(), ratio, importance=importance, calib=calib, prune_hidden=prune_hidden)
        kept = count_parameters(model) / dense
        if best is None or abs(kept - params_keep) < abs(best[2] - params_keep):
            best = (model, ratio, kept)
        if abs(kept - params_keep) <= tolerance:
            break
        if kept > params_keep:
            lo, kept_lo = ratio, kept
        else:
            hi, kept_hi = ratio, kept
        if hi is None:   # not bracketed yet: extrapolate the line through (0, 1) and (lo, kept_lo)
            ratio = min(0.95, lo * (1.0 - params_keep) / max(1.0 - kept_lo, 1e-6) if lo > 0 else 0.5)
        else:
            guess = lo + (hi - lo) * (kept_lo - params_keep) / max(kept_lo - kept_hi, 1e-9)
            margin = 0.05 * (hi - lo)
            ratio = min(max(guess, lo + margin), hi - margin)
    return best
