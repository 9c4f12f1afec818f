"""LLM-Pruner (Ma et al. 2023): Taylor importance of coupled units from the LM loss.

With ``L`` the causal LM loss (mean over tokens and calibration samples; paper: 10 samples),
``g = dL/dw`` its gradient and ``F = (1/S) sum_s (dL_s/dw)^2`` the diagonal empirical Fisher of the
S per-sample losses, each weight element ``w`` of a unit gets (``taylor`` option):

    param_first   |w * g|                       element-wise first order (default)
    param_second  |w * F * w|                   element-wise second order
    param_mix     |w * g - 1/2 * w * F * w|     first minus half the second-order term
    vectorize     per weight vector v (one row or column of a member slice): |sum_{e in v} w_e g_e|

and a member (one projection slice of the unit, its bias folded in) sums its elements.  The unit's
importance aggregates its members (``aggregate``): ``sum`` (default), ``mean``, ``max``, ``prod``
or ``last`` (the last executing member: o_proj / down_proj columns).  Units are KV groups (or
query heads, ``gqa="query_heads"``) and FFN channels of the prunable ``layers`` (default
``"4:-2"``: the paper skips the first and last layers; all layers below 8), plus hidden channels
with ``prune_hidden``.

Memory: only the scored projections require grad (embeddings, norms and the LM head do not,
unless hidden channels are scored), samples go one at a time and the LM head + loss run in
chunks of ``loss_chunk`` positions, so the extra memory is one gradient copy of the scored weights
(``param_first``/``vectorize``; ``param_second`` keeps the Fisher instead; ``param_mix`` both)
plus one sample's activations: decoder layers are checkpointed (``checkpoint=True``: each
layer's activations are recomputed in backward, about a third more compute for a few MB instead
of hundreds).  The model's requires_grad flags, grads and train flag are
restored afterwards.

Allocation: ``per_root`` by default, the official code's arithmetic: one pruning ratio applied to
every k_proj and gate_proj root of the prunable layers, the k_proj channels it prunes taken in
whole KV groups rounded down (:func:`structlm.methods._width.per_root_removed_steps`), the ratio
the smallest that meets the params target.  ``allocation="uniform"`` (KV groups rounded down
by default, FFN refilled to the target; with ``attn_rounding="round"`` structlm's earlier default) and the
others remain options.

KV-group scores under GQA (``kv_fold``): a KV group's members are its k/v rows (head_dim each)
and the q rows / o columns of its n_rep query heads (n_rep x head_dim).  The official
``TaylorImportance`` sums each member's per-channel salience and, where members differ in length,
folds the longer ones with ``view(n_rep, n_kv * head_dim).sum(0)``: KV group g is scored with the
q/o salience of query heads g, g + n_kv, g + 2 n_kv, ... (not the heads that attend with it;
the heads removed with it are the right ones).  ``kv_fold="official"`` (default) does the same,
so the KV groups chosen are the official code's; ``kv_fold="grouped"`` sums the heads that
attend with the group.  On SmolLM2-135M (docs/width-methods.md, issue #18) the official fold is
better at 70% kept (151 vs 181, seed 0) and 80%, far worse at 50% (one KV group kept: 4755 vs
769) and less steady over calibration seeds.  Without GQA or with one KV group both are the same.

Options: ``taylor`` ("param_first"), ``aggregate`` ("sum"), ``kv_fold`` ("official"),
``max_samples`` (10), ``loss_chunk`` (32), ``checkpoint`` (True) and the allocation options of
:func:`structlm.methods._width.allocate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import distributed
from . import register
from ._width import (WidthError, aggregate as aggregate_fn, allocate, attention_kind, check_reach, member_matrix,
                     model_state_guard, reject_unknown, score_summary, width_options)

TAYLOR = ("param_first", "param_second", "param_mix", "vectorize")
KV_FOLDS = ("official", "grouped")


def default_layers(graph) -> str:
    return "4:-2" if graph.n_layers >= 8 else "all"


def lm_loss_backward(model, ids: torch.Tensor, scale: float = 1.0, chunk: int = 128) -> float:
    """Backward of ``scale * mean token cross-entropy`` of ``ids`` (the model's causal LM loss),
    with the LM head and the loss computed ``chunk`` positions at a time.  Returns the loss."""
    out = model.base_model(input_ids=ids, use_cache=False)
    h = out[0]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    h_det = h.detach().requires_grad_(True)
    n_pos = ids.shape[1] - 1
    n = n_pos * ids.shape[0]
    total = 0.0
    for start in range(0, n_pos, chunk):
        stop = min(start + chunk, n_pos)
        logits = head(h_det[:, start:stop]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, start + 1:stop + 1].reshape(-1),
                               reduction="sum") / n
        (loss * scale).backward()
        total += float(loss.detach())
    if h.requires_grad:
        h.backward(h_det.grad)
    return total


class _Checkpointed:
    """Recompute a decoder layer in backward instead of keeping its activations (an instance
    ``forward`` over the class one); ``remove()`` puts the layer back."""

    def __init__(self, module):
        self.module = module
        original = module.forward

        def forward(*args, **kwargs):
            return _checkpoint(original, *args, use_reentrant=False, **kwargs)
        module.forward = forward

    def remove(self):
        self.module.__dict__.pop("forward", None)


def checkpoint_layers(model, first: int, handles: list) -> None:
    """Checkpoint every decoder layer from ``first`` on (layers below need no backward)."""
    from ..families import get_adapter

    ad = get_adapter(model.config)
    for i in range(first, ad.n_layers):
        handles.append(_Checkpointed(model.get_submodule(ad.layer(i))))


def taylor_scores(model, graph, calib: torch.Tensor, layers: list[int], *, taylor: str = "param_first",
                  gqa: str = "kv_groups", aggregate: str = "sum", hidden: bool = False, loss_chunk: int = 32,
                  checkpoint: bool = True, handles: list | None = None, kinds=None,
                  kv_fold: str = "grouped") -> tuple[dict, dict]:
    """Unit scores from gradients of the LM loss on ``calib`` [S, L] (one sample at a time).
    Call inside :func:`model_state_guard` (it changes requires_grad and grads).  ``kinds``: the
    attention/FFN unit kinds to score (default: the ``gqa`` mode's attention kind and "ffn_channel").
    ``kv_fold``: which query heads' q rows / o columns a KV group's score sums: ``grouped`` (the
    heads that attend with it) or ``official`` (LLM-Pruner's code; see :func:`_width.member_vector`)."""
    if taylor not in TAYLOR:
        raise WidthError(f"llm_pruner: unknown taylor {taylor!r}; choose from {', '.join(TAYLOR)}")
    if kv_fold not in KV_FOLDS:
        raise WidthError(f"llm_pruner: unknown kv_fold {kv_fold!r}; choose from {', '.join(KV_FOLDS)}")
    kind = attention_kind(graph, gqa)
    kinds = tuple(kinds) if kinds else (kind, "ffn_channel")
    groups = [graph.group(k, i) for i in layers for k in kinds]
    if hidden:
        groups.append(graph.group("hidden_channel", None))
    scored = list(dict.fromkeys(m.param for g in groups for m in g.members))
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for name in scored:
        params[name].requires_grad_(True)
    n_samples = calib.shape[0]
    second = taylor in ("param_second", "param_mix")
    fisher: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    if second:
        def hook_for(name):
            def hook(p):
                g = p.grad.float()
                if name in fisher:
                    fisher[name].addcmul_(g, g, value=n_samples)  # (dL_s/dw)^2 / S with grad = dL_s/dw / S
                else:
                    fisher[name] = g.square().mul_(n_samples)
                if taylor == "param_mix":
                    if name in first:
                        first[name].add_(g)
                    else:
                        first[name] = g.clone()
                p.grad = None
            return hook
        for name in scored:
            h = params[name].register_post_accumulate_grad_hook(hook_for(name))
            if handles is not None:
                handles.append(h)
    if checkpoint and handles is not None:
        checkpoint_layers(model, 0 if hidden else min(layers), handles)
    device = next(model.parameters()).device
    losses = []
    with torch.enable_grad():
        # under torchrun each rank back-propagates its share of the samples (each scaled by 1 / all samples)
        for s in distributed.shard_range(n_samples):
            losses.append(lm_loss_backward(model, calib[s:s + 1].to(device), 1.0 / n_samples, loss_chunk))
    if not second:
        first = {name: params[name].grad for name in scored}
    if distributed.world_size() > 1:   # gradients (or Fisher and first order) summed over the ranks
        for name in scored:
            if first.get(name) is None and not second:
                first[name] = params[name].grad = torch.zeros_like(params[name])
        distributed.reduce_tensors([t for d in (first, fisher) for _, t in sorted(d.items()) if t is not None])
    loss_sum, _ = distributed.reduce_floats(sum(losses), len(losses))

    cache: dict = {}

    def elem(name):
        if name not in cache:
            cache.clear()
            w = params[name].detach().float()
            if taylor in ("param_first", "vectorize"):
                g = first[name]
                if g is None:  # no gradient reached it (e.g. an unused parameter)
                    g = torch.zeros_like(w)
                e = w * g
                cache[name] = e if taylor == "vectorize" else e.abs_()
            elif taylor == "param_second":
                cache[name] = (w * w * fisher[name]).abs_()
            else:
                cache[name] = (w * first[name] - 0.5 * w * w * fisher[name]).abs_()
        return cache[name]

    scores = {}
    for g in groups:
        fold = kv_fold == "official" and g.kind == "kv_group"
        v = aggregate_fn(member_matrix(g, elem, vectorize=taylor == "vectorize", fold=fold), aggregate)
        scores[(g.kind, g.layer)] = v
    for name in scored:  # free the gradients as soon as the scores are out
        params[name].grad = None
    fisher.clear()
    first.clear()
    return scores, {"loss": loss_sum / max(n_samples, 1), "samples": n_samples}


@register("llm_pruner")
def llm_pruner(model, graph, target, calib, **options):
    alloc, gqa, layers, prune_hidden = width_options(model, graph, options, default_layers=default_layers(graph),
                                                     default_allocation="per_root")
    taylor = options.pop("taylor", "param_first")
    how = options.pop("aggregate", "sum")
    max_samples = options.pop("max_samples", 10)
    loss_chunk = int(options.pop("loss_chunk", 32))
    checkpoint = bool(options.pop("checkpoint", True))
    global_score = options.pop("global_score", "density")
    kv_fold = options.pop("kv_fold", "official")
    reject_unknown("llm_pruner", options)
    check_reach(graph, target, gqa, layers, alloc, prune_hidden)
    if calib is None or calib.ndim != 2 or calib.shape[1] < 2:
        raise WidthError("llm_pruner needs calibration token ids [N, L] with L >= 2")
    calib = calib[:max_samples] if max_samples else calib
    with model_state_guard(model) as handles:
        model.eval()
        scores, loss_info = taylor_scores(model, graph, calib, layers, taylor=taylor, gqa=gqa, aggregate=how,
                                          hidden=prune_hidden, loss_chunk=loss_chunk, checkpoint=checkpoint,
                                          handles=handles, kv_fold=kv_fold)
    hidden_scores = scores.pop(("hidden_channel", None), None)
    plan, info = allocate(graph, scores, target, layers=layers, hidden_scores=hidden_scores,
                          global_score=global_score, **alloc)
    info.update(method="llm_pruner", taylor=taylor, aggregate=how, kv_fold=kv_fold, gqa=gqa, layers=layers, prune_hidden=prune_hidden,
                calibration=list(calib.shape), calibration_loss=round(loss_info["loss"], 5),
                scores=score_summary(scores))
    return plan, info
