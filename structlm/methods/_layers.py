"""Shared machinery of the layer-pruning methods (last_blocks, shortgpt, sleb, finercut).

* :class:`LayerRunner` runs a decoder's layers one at a time, the way the stock ``XModel.forward``
  does (its own rotary embedding module, ``create_causal_mask`` / ``create_sliding_window_causal_mask``
  per layer type, Gemma 3's per-layer-type position embeddings), and can skip an attention or FFN
  sublayer of any layer by swapping in a zero placeholder for the duration of one call.
* :class:`Trace` caches, for a set of calibration samples, the hidden states entering every layer of
  the *current* (partly pruned) model, so that the forward of a candidate removal starts at the
  candidate's layer, and after a removal only the layers from the removed one on are recomputed.
* :func:`greedy_remove` is the greedy search shared by SLEB (blocks, calibration perplexity) and
  FinerCut (sublayers, distance to the dense output): score every remaining candidate, remove the
  best, repeat on the pruned model until the target is met, with optional screening on a subset
  of the samples, confirmation of the best few on all samples, and lazy re-scoring.
* Target accounting (:func:`target_reached`, :func:`plan_from_removed`) in the graph's units.

Nothing here changes the model permanently: placeholders are swapped in and restored in
``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..families import get_adapter
from ..layout import RemovedAttention, Zero
from ..plan import LayerPlan, PrunePlan
from ..targets import Target

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
SUBLAYERS = ("attention", "ffn")


class UnsupportedRunnerError(ValueError):
    """The layer runner does not know how to run this family's decoder layers one by one."""


# ---------------------------------------------------------------------------------------------
# running layers
# ---------------------------------------------------------------------------------------------
class _Context:
    """Positions, masks and position embeddings for one batch shape."""

    def __init__(self, positions, masks, embeddings):
        self.positions, self.masks, self.embeddings = positions, masks, embeddings


class LayerRunner:
    """Run the decoder layers of a Hugging Face causal LM one at a time.

    Supported families: llama, mistral, qwen2, qwen3, gemma3, phi3 (pre-norm decoders whose
    layers take ``position_embeddings`` and a mask built by transformers' masking utilities).
    Others raise :class:`UnsupportedRunnerError`."""

    def __init__(self, model):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        adapter = get_adapter(model.config)
        if adapter.family not in SUPPORTED_FAMILIES:
            raise UnsupportedRunnerError(
                f"the layer-pruning runner does not support family {adapter.family!r} "
                f"(model_type {getattr(model.config, 'model_type', None)!r}); supported: "
                f"{', '.join(SUPPORTED_FAMILIES)}")
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UnsupportedRunnerError("bidirectional attention is not supported by the layer runner")
        self.model = model
        self.adapter = adapter
        base_name = adapter.layer_prefix.split(".layers.")[0]
        self.base = model.get_submodule(base_name)
        self.layers = self.base.layers
        self.n = len(self.layers)
        self.config = self.base.config
        self.attn_name, self.mlp_name = adapter.attn_module, adapter.mlp_module
        self.types = [adapter.layer_kind(i) for i in range(self.n)]
        self.rotary = self.base.rotary_emb
        self._typed_rotary = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self._mask_fns = {"full_attention": create_causal_mask,
                          "sliding_attention": create_sliding_window_causal_mask}
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._contexts: dict = {}
        self.layer_passes = 0      # sample-layer passes run (for the cost report)
        self.head_tokens = 0       # tokens sent through the lm_head

    # ---- pieces of the stock forward ----
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(ids)

    def context(self, h: torch.Tensor) -> _Context:
        key = (h.shape[0], h.shape[1], h.dtype, h.device)
        ctx = self._contexts.get(key)
        if ctx is None:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            masks, embeddings = {}, {}
            for t in sorted(set(self.types)):
                masks[t] = self._mask_fns[t](config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                             position_ids=pos)
                embeddings[t] = self.rotary(h, pos, t) if self._typed_rotary else None
            if not self._typed_rotary:
                shared = self.rotary(h, position_ids=pos)
                embeddings = {t: shared for t in embeddings}
            ctx = self._contexts[key] = _Context(pos, masks, embeddings)
        return ctx

    @contextlib.contextmanager
    def skipping(self, i: int, attention: bool = True, ffn: bool = True):
        """Temporarily replace layer ``i``'s attention and/or FFN by zero placeholders."""
        layer = self.layers[i]
        saved = {}
        try:
            if not attention:
                saved[self.attn_name] = layer._modules[self.attn_name]
                layer._modules[self.attn_name] = RemovedAttention(None)
            if not ffn:
                saved[self.mlp_name] = layer._modules[self.mlp_name]
                layer._modules[self.mlp_name] = Zero()
            yield layer
        finally:
            for name, module in saved.items():
                layer._modules[name] = module

    def layer(self, i: int, h: torch.Tensor, ctx: _Context | None = None, attention: bool = True,
              ffn: bool = True) -> torch.Tensor:
        """Layer ``i`` on ``h``; a removed sublayer adds nothing to the residual stream."""
        if not attention and not ffn:
            return h
        ctx = ctx or self.context(h)
        t = self.types[i]
        with self.skipping(i, attention, ffn) as layer:
            out = layer(h, attention_mask=ctx.masks[t], position_embeddings=ctx.embeddings[t],
                        position_ids=ctx.positions)
        self.layer_passes += h.shape[0]
        return out[0] if isinstance(out, tuple) else out

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (the model's last hidden state)."""
        return self.base.norm(h)

    def logits(self, hn: torch.Tensor) -> torch.Tensor:
        self.head_tokens += hn.shape[0] * hn.shape[1]
        logits = self.model.get_output_embeddings()(hn)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward_hidden(self, ids: torch.Tensor, removed=()) -> torch.Tensor:
        """The final (normed) hidden state of the model with ``removed`` sublayers skipped."""
        h = self.embed(ids)
        ctx = self.context(h)
        removed = set(removed)
        for i in range(self.n):
            h = self.layer(i, h, ctx, (i, "attention") not in removed, (i, "ffn") not in removed)
        return self.final(h)


SCORING_DTYPES = ("auto", "float32", "bfloat16", "float16", "model")


def fast_bf16_available(device) -> bool:
    """bf16 matmuls are fast here: a GPU, or a CPU with AVX512-BF16 / AMX."""
    if torch.device(device).type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def scoring_model(model, dtype: str = "auto"):
    """The model the greedy searches score candidates on.

    ``"model"`` (or the model's own dtype): the model itself.  ``"auto"``: a bfloat16 copy when
    the model is float32 and bf16 matmuls are fast on its device (1.7x faster on a 2-core
    AVX512-BF16 CPU; FinerCut's step-1 ranking of SmolLM2's 60 sublayers had Spearman 0.9999 with
    float32's, same order of the top 8, see docs/layer-methods.md), else the model itself.  The
    copy costs the model's size in the new dtype; plans are indices, so they carry over."""
    if dtype not in SCORING_DTYPES:
        raise ValueError(f"unknown scoring dtype {dtype!r}; choose one of {', '.join(SCORING_DTYPES)}")
    current = next(model.parameters())
    if dtype == "model":
        return model
    if dtype == "auto":
        if current.dtype != torch.float32 or not fast_bf16_available(current.device):
            return model
        dtype = "bfloat16"
    wanted = getattr(torch, dtype)
    if current.dtype == wanted:
        return model
    return copy.deepcopy(model).to(wanted)


def skip_set(unit) -> set:
    """The sublayers a candidate unit removes: (i, "attention"|"ffn") or both for (i, "block")."""
    i, kind = unit
    return {(i, "attention"), (i, "ffn")} if kind == "block" else {(i, kind)}


class Trace:
    """Hidden states entering every layer (and leaving the last) of the current model, for a set of
    samples cut into batches; ``removed`` holds the sublayers the current model skips."""

    def __init__(self, runner: LayerRunner, ids: torch.Tensor, batch_size: int = 8, removed=()):
        self.runner = runner
        self.ids = ids
        self.batches = [ids[s:s + batch_size] for s in range(0, ids.shape[0], batch_size)]
        self.removed: set = set(removed)
        n = runner.n
        self.inputs: list[list] = [[None] * len(self.batches) for _ in range(n + 1)]
        for b, batch in enumerate(self.batches):
            self.inputs[0][b] = runner.embed(batch)
        self.recompute_from(0)

    @property
    def samples(self) -> int:
        return int(self.ids.shape[0])

    def _keeps(self, i: int, skip=frozenset()):
        gone = self.removed | skip
        return (i, "attention") not in gone, (i, "ffn") not in gone

    def recompute_from(self, start: int) -> None:
        r = self.runner
        for b in range(len(self.batches)):
            h = self.inputs[start][b]
            ctx = r.context(h)
            for i in range(start, r.n):
                h = r.layer(i, h, ctx, *self._keeps(i))
                self.inputs[i + 1][b] = h

    def remove(self, unit) -> None:
        self.removed |= skip_set(unit)
        self.recompute_from(unit[0])

    def run(self, b: int, start: int, skip=frozenset()) -> torch.Tensor:
        """Final normed hidden state of batch ``b`` with ``skip`` removed too, from layer ``start``
        (the cached input of ``start`` is reused: layers before it are unaffected)."""
        r = self.runner
        h = self.inputs[start][b]
        ctx = r.context(h)
        for i in range(start, r.n):
            h = r.layer(i, h, ctx, *self._keeps(i, skip))
        return r.final(h)

    def output(self, b: int) -> torch.Tensor:
        return self.runner.final(self.inputs[self.runner.n][b])


# ---------------------------------------------------------------------------------------------
# scores of a pruned model's final output
# ---------------------------------------------------------------------------------------------
DISTANCES = ("js", "kl", "angular", "norm")


class OutputDistance:
    """Distance between the current candidate's final output and the dense model's, averaged over
    calibration tokens (FinerCut's d).  ``angular``: arccos(cos)/pi between final normed hidden
    states (no lm_head); ``js`` / ``kl`` (KL(dense || pruned)): between next-token distributions;
    ``norm``: Frobenius norm of the logit difference per sample, averaged over samples.  Logit
    distances use ``positions`` evenly spread positions per sample (None: all)."""

    def __init__(self, runner: LayerRunner, trace: Trace, kind: str = "js", positions: int | None = None):
        if kind not in DISTANCES:
            raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")
        self.runner, self.kind = runner, kind
        seq = trace.ids.shape[1]
        if positions is None or positions >= seq:
            self.index = None
        else:
            self.index = torch.linspace(0, seq - 1, max(1, int(positions))).round().long().unique()
        self.reference = [self._features(trace.output(b)) for b in range(len(trace.batches))]

    def _features(self, hn):
        if self.kind == "angular":
            return hn
        if self.index is not None:
            hn = hn[:, self.index.to(hn.device)]
        logits = self.runner.logits(hn).float()
        return logits if self.kind == "norm" else F.log_softmax(logits, dim=-1)

    def __call__(self, b: int, hn: torch.Tensor) -> tuple[float, int]:
        """(sum, count) over batch ``b``."""
        ref, cur = self.reference[b], self._features(hn)
        if self.kind == "angular":
            cos = F.cosine_similarity(ref.float(), cur.float(), dim=-1).clamp(-1.0, 1.0)
            d = torch.arccos(cos) / math.pi
            return float(d.sum()), d.numel()
        if self.kind == "norm":
            d = torch.linalg.matrix_norm(ref - cur)          # per sample, over positions x vocab
            return float(d.sum()), d.numel()
        if self.kind == "kl":                                # KL(P_dense || P_pruned) per token
            d = (ref.exp() * (ref - cur)).sum(-1)
            return float(d.sum()), d.numel()
        log_m = torch.logaddexp(ref, cur) - math.log(2.0)   # JS = (KL(P||M) + KL(Q||M)) / 2
        d = 0.5 * ((ref.exp() * (ref - log_m)).sum(-1) + (cur.exp() * (cur - log_m)).sum(-1))
        return float(d.clamp_min(0).sum()), d.numel()


class CalibrationNLL:
    """Next-token negative log-likelihood of the calibration tokens (SLEB's criterion; the score
    is the mean NLL per token, i.e. log perplexity)."""

    def __init__(self, runner: LayerRunner, trace: Trace):
        self.runner, self.trace = runner, trace

    def __call__(self, b: int, hn: torch.Tensor) -> tuple[float, int]:
        ids = self.trace.batches[b]
        logits = self.runner.logits(hn[:, :-1]).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        return float(nll), ids[:, 1:].numel()


def _sig(x: float, digits: int = 7) -> float:
    return float(f"{x:.{digits}g}")


def score_candidate(trace: Trace, scorer, unit) -> float:
    from .. import distributed

    total, count = 0.0, 0
    skip = frozenset(skip_set(unit))
    for b in range(len(trace.batches)):
        s, c = scorer(b, trace.run(b, unit[0], skip))
        total += s
        count += c
    total, count = distributed.reduce_floats(total, count)   # over the ranks' samples (torchrun)
    if not math.isfinite(total):
        raise ValueError(f"the score of removing {unit[1]} {unit[0]} is not finite (NaN/Inf): the model's weights or "
                         f"the calibration data are broken; check the model with structlm eval")
    return total / max(count, 1)


def score_current(trace: Trace, scorer) -> float:
    from .. import distributed

    total, count = 0.0, 0
    for b in range(len(trace.batches)):
        s, c = scorer(b, trace.output(b))
        total += s
        count += c
    total, count = distributed.reduce_floats(total, count)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# targets and plans
# ---------------------------------------------------------------------------------------------
def plan_from_removed(graph, removed) -> PrunePlan:
    """A plan from removed units (i, "attention"|"ffn"|"block"); a layer that loses both
    sublayers becomes a removed block."""
    gone = set()
    for unit in removed:
        gone |= skip_set(unit)
    blocks = sorted(i for i in range(graph.n_layers) if (i, "attention") in gone and (i, "ffn") in gone)
    layers = {}
    for i, kind in sorted(gone):
        if i in blocks:
            continue
        lp = layers.setdefault(i, LayerPlan())
        setattr(lp, kind, False)
    return PrunePlan(layers=layers, removed_blocks=blocks, family=graph.family)


def removed_sublayer_count(removed) -> int:
    return len(set().union(*(skip_set(u) for u in removed))) if removed else 0


def target_reached(graph, target: Target, removed, unit: str) -> bool:
    """Whether removing ``removed`` meets ``target``.  ``params=x``: the plan keeps at most x of the
    parameters (``plan.cost(graph)["params"] <= x * total``).  ``sublayers=k``: k sublayers gone
    (a block counts as two).  ``blocks=k``: k blocks gone for block methods; for sublayer methods
    2k sublayers (the same amount of sublayers as k blocks).  ``speedup=`` / ``latency_ms=``: the
    plan's latency predicted by the target's table is within the budget."""
    if target.kind == "params":
        plan = plan_from_removed(graph, removed)
        return plan.cost(graph)["params"] <= target.value * graph.accounting()["total"]
    if target.is_latency:     # speedup= / latency_ms=: the latency table's prediction within the budget
        plan = plan_from_removed(graph, removed)
        return target.latency.predict(graph, plan)["total_ms"] <= target.latency_budget(graph)
    count = removed_sublayer_count(removed)
    if target.kind == "sublayers":
        return count >= int(target.value)
    if target.kind == "blocks":
        return count >= 2 * int(target.value)
    raise ValueError(f"unsupported target kind {target.kind!r}")


def check_reachable(graph, target: Target, units) -> None:
    if not target_reached(graph, target, units, "any"):
        more = ""
        if target.is_latency:
            table = target.latency
            best = table.predict(graph, plan_from_removed(graph, units))["total_ms"]
            more = (f": the fastest it can give is predicted at {best:.2f} ms (x{table.dense_ms(graph) / best:.2f}), "
                    f"the budget is {target.latency_budget(graph):.2f} ms")
        raise ValueError(f"target {target} cannot be met by removing {units[0][1]} units of this model "
                         f"(even removing all of them is not enough{more})")


def finish_plan(graph, removed, order: list[dict], target: Target, method: str) -> PrunePlan:
    plan = plan_from_removed(graph, removed)
    cost = plan.cost(graph)
    plan.meta.update(removal_order=order, removed_params=cost["dense_params"] - cost["params"],
                     params_ratio=round(cost["params_ratio"], 6))
    if len(plan.removed_blocks) >= graph.n_layers:
        raise ValueError(f"{method}: target {target} would remove every block")
    return plan


# ---------------------------------------------------------------------------------------------
# the greedy search
# ---------------------------------------------------------------------------------------------
def greedy_remove(runner: LayerRunner, graph, target: Target, calib: torch.Tensor, candidates: list,
                  make_scorer, *, name: str, screen_samples: int | None = None, confirm_top: int = 1,
                  lazy: bool = False, batch_size: int = 8, progress: bool = True,
                  max_steps: int | None = None) -> tuple[list, list[dict], dict]:
    """Remove candidates one at a time, each time the one whose removal scores lowest on the
    current (already pruned) model, until ``target`` is met.

    * ``screen_samples``: score every candidate on the first k samples only (None/0: all samples);
    * ``confirm_top``: with screening, re-score the best ``confirm_top`` candidates on all samples
      and remove the best of those (1: trust the screen);
    * ``lazy``: re-score candidates in the order of their last score and stop as soon as the best
      fresh score is <= every remaining stale score (exact when removing more sublayers never
      lowers a candidate's score; a heuristic otherwise).

    Returns (removed units, per-step records, cost statistics)."""
    from .. import distributed

    n_samples = int(calib.shape[0])
    screen_n = n_samples if not screen_samples or screen_samples >= n_samples else int(screen_samples)
    started = time.perf_counter()
    passes0, head0 = runner.layer_passes, runner.head_tokens
    # under torchrun each rank traces its share of the (screened) samples; scores are summed over the ranks
    screen = Trace(runner, distributed.shard(calib[:screen_n], batch_size), batch_size)
    confirm = confirm_top > 1 and screen_n < n_samples
    full = Trace(runner, distributed.shard(calib, batch_size), batch_size) if confirm else screen
    screen_scorer = make_scorer(screen)
    full_scorer = make_scorer(full) if confirm else screen_scorer
    setup_passes = runner.layer_passes - passes0
    removed: list = []
    stale: dict = {}
    steps: list[dict] = []
    full_forward = runner.n * n_samples       # sample-layer passes of one full forward
    while not target_reached(graph, target, removed, name):
        if max_steps is not None and len(steps) >= max_steps:
            break
        remaining = [c for c in candidates if c not in removed]
        if not remaining:
            raise ValueError(f"{name}: no candidates left before target {target} was met")
        step_start, step_passes, step_head = time.perf_counter(), runner.layer_passes, runner.head_tokens
        order = sorted(remaining, key=lambda c: (stale.get(c, -math.inf), c))
        fresh: dict = {}
        drops = 0
        bar = tqdm(total=len(order), desc=f"{name} step {len(steps) + 1}", unit="cand", disable=not progress,
                   leave=False)
        for c in order:
            if lazy and fresh and c in stale and stale[c] >= min(fresh.values()):
                break
            fresh[c] = score_candidate(screen, screen_scorer, c)
            if c in stale and fresh[c] < stale[c]:
                drops += 1   # the lazy bound's assumption failed for c (its score fell)
            stale[c] = fresh[c]
            bar.update(1)
            bar.set_postfix(best=f"{min(fresh.values()):.4g}")
        bar.close()
        ranked = sorted(fresh, key=lambda c: (fresh[c], c))
        chosen, confirmed = ranked[0], None
        if confirm:
            confirmed = {c: score_candidate(full, full_scorer, c) for c in ranked[:confirm_top]}
            chosen = min(confirmed, key=lambda c: (confirmed[c], c))
        removed.append(chosen)
        screen.remove(chosen)
        if full is not screen:
            full.remove(chosen)
        stale.pop(chosen, None)
        passes = runner.layer_passes - step_passes
        record = {"step": len(steps) + 1, "layer": chosen[0], "sublayer": chosen[1],
                  "score": confirmed[chosen] if confirmed else fresh[chosen],
                  "screen_score": fresh[chosen], "evaluated": len(fresh), "skipped_lazily": len(order) - len(fresh),
                  "candidate_scores": {f"{i}.{k}": _sig(v) for (i, k), v in sorted(fresh.items())},
                  "score_drops": drops,
                  "forwards": round(passes / full_forward, 3),
                  "head_tokens": runner.head_tokens - step_head,
                  "seconds": round(time.perf_counter() - step_start, 2)}
        if confirmed:
            record["confirm_scores"] = {f"{i}.{k}": _sig(v) for (i, k), v in confirmed.items()}
        steps.append(record)
        if progress:
            tqdm.write(f"{name} step {record['step']}: removed layer {chosen[0]} {chosen[1]} "
                       f"(score {record['score']:.4g}, {len(fresh)} scored, {record['seconds']:.1f} s)")
    total_passes = runner.layer_passes - passes0
    stats = {"screen_samples": screen_n, "samples": n_samples, "confirm_top": confirm_top if confirm else 1,
             "lazy": lazy, "batch_size": batch_size, "steps": len(steps),
             "setup_forwards": round(setup_passes / full_forward, 3),
             "forwards": round(total_passes / full_forward, 3),
             "forwards_note": "body forward-equivalents: sample-layer passes / (layers x calibration samples)",
             "head_tokens": runner.head_tokens - head0,
             "seconds": round(time.perf_counter() - started, 2)}
    return removed, steps, stats
