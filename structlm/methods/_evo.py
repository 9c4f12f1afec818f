"""Evolutionary refinement of ZipLM's level choice (``-O search=evo``; EvoPress / DarwinLM style).

ZipLM's dynamic programme (:func:`structlm.methods.ziplm.dp_choice`, ``dp_latency``) picks one
level per sublayer minimising the *summed* per-sublayer calibration errors of the level database.
Errors of different sublayers do not really add up (a perturbation early in the stack is
amplified or damped by the layers after it), so the summed error is only a proxy of what the
pruned model loses.  This module searches around the DP's choice with the model's own output as
the judge (Sieberling et al. 2024, EvoPress; Tang et al. 2025, DarwinLM):

* **Candidates** are level vectors (one level index per sublayer of the database, its last level
  "removed", so width and depth trade in one search).  The first parent is the DP's choice.
* **Offspring by level-switch mutation**: ``min(U{1,3}, U{1,3})`` switches (biased towards one),
  each lowering one sublayer's level by ``k`` levels (less pruning) and raising another sublayer
  *of the same kind* (attention with attention, FFN with FFN) by ``k`` (more pruning), ``k`` drawn
  from ``1 .. max(1, levels / 8)`` biased towards 1 (FFN levels are 8 channels apart, so one
  switch moves up to an eighth of a sublayer).  Levels of different sublayers remove different
  amounts, so a switch can break the budget: it is then **repaired** by raising the level of
  random other sublayers (not the lowered ones) one at a time until the budget holds; a child
  that cannot be repaired, repeats the parent or repeats another child is dropped.  The slack a
  child has left (a raise removes more than the lowering gave back) is then spent: one pass over
  the sublayers not raised, in random order, lowers each by one level where the budget still
  holds, so children stay at the budget's edge as the DP's choice does.  Every
  candidate meets the same budget as the DP: params targets ``removed params >= dense - budget``
  (``removed_params``, the DP's accounting), latency targets ``predicted time <= budget``
  priced per layer by the same ``LatencyTable.layer_ms`` of the (attention, FFN) configuration
  as ``allocate_latency`` (exactly, no discretisation).
* **Selection in stages** with growing numbers of calibration tokens: all offspring are scored
  on a random ``1/16`` of the fitness sequences, the best quarter survive to a random ``1/4``,
  the best of those is scored on all fitness sequences (stages that would not select anything
  are skipped), and it replaces the parent only if its fitness there is lower (**elitism**: the
  parent's fitness is always on all fitness sequences, so the result never has a worse fitness
  than the DP start).
* **Budget**: ``evo_generations`` generations of ``evo_offspring`` children, stopped early after
  ``evo_seconds`` of wall time (a generation cut short is discarded).  The setup (dense Gram
  matrices, dense reference, the DP start's fitness) is counted in the seconds.

**Fitness model.**  ``KL(dense || candidate)`` of the next-token distributions, averaged over the
tokens of the first ``evo_tokens / seq_len`` calibration sequences (every position).  A candidate
is assembled on the model itself (restored afterwards): removed sublayers are skipped by the layer
runner (what ``surgery`` does to them), and the o_proj / down_proj of a pruned sublayer get zeros
in the removed input columns (the removed heads / channels then contribute nothing, as in the
masked model) and, in the kept columns, the least-squares re-fit ``W H[:, K] H[K, K]^-1`` on the
*dense* model's Gram matrices (collected once on all calibration sequences, dampened like the
level database; re-fits cached per (sublayer, level)).  That is exactly the model the plan with
``-O sequential=false`` reconstruction gives (tests/test_ziplm_evo.py holds them equal).  The
winner then goes through the usual *sequential* reconstruction, whose re-fits see the pruned
earlier layers' inputs, so the final model differs from the one the search scored (usually by
being better).  The dense reference log-probabilities are kept (float32) when they fit in 1 GiB,
else recomputed from the stored dense final hidden states at every evaluation.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._layers import LayerRunner
from ._width import input_dim

SEARCHES = ("dp", "evo")
DEFAULTS = {"evo_generations": 20, "evo_offspring": 8, "evo_seconds": math.inf, "evo_tokens": 4096, "evo_seed": 0}
OPTIONS = ("search",) + tuple(DEFAULTS)
CACHE_BYTES = 512 * 2 ** 20          # least-squares re-fits kept at a time
REFERENCE_BYTES = 2 ** 30            # dense log-probabilities kept (float32) up to this size
HEAD_CHUNK = 512                     # tokens per lm_head chunk of a KL evaluation


# ---- options ---------------------------------------------------------------------------------------

def parse_options(options: dict, error) -> dict:
    """``search`` and the ``evo_*`` options, validated (one ``error`` each)."""
    search = options.get("search", "dp")
    if search not in SEARCHES:
        raise error(f"ziplm: unknown search {search!r}; choose from {', '.join(SEARCHES)}")
    given = [k for k in DEFAULTS if options.get(k) is not None]
    if search == "dp" and given:
        raise error(f"ziplm: {', '.join(given)} set(s) the evolutionary search; add -O search=evo "
                    f"(the default search=dp takes none)")
    if search == "evo":   # its fitness runs candidate models on the calibration sequences of one process
        from .. import distributed

        distributed.refuse("ziplm -O search=evo", "the evolutionary search scores its candidates on one process's "
                           "sequences, and a wall-clock limit would make the ranks choose differently",
                           "run it in one process, or use the default search=dp under torchrun")
    out = {"search": search}

    def get(key):
        return DEFAULTS[key] if options.get(key) is None else options[key]

    def whole(key, low):
        v = get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < low:
            raise error(f"ziplm: {key} must be a whole number >= {low} (got {v!r}), e.g. -O {key}={DEFAULTS[key]}")
        return int(v)

    out["generations"] = whole("evo_generations", 0)
    out["offspring"] = whole("evo_offspring", 1)
    out["tokens"] = whole("evo_tokens", 1)
    out["seed"] = whole("evo_seed", 0)
    seconds = get("evo_seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise error(f"ziplm: evo_seconds must be a positive number of seconds (got {seconds!r}), e.g. -O evo_seconds=600")
    out["seconds"] = float(seconds)
    return out


# ---- budgets ---------------------------------------------------------------------------------------

class ParamsBudget:
    """A params target: at least ``need`` parameters removed, counted per (sublayer, level)."""

    kind = "params"

    def __init__(self, removed: list[list[int]], need: int):
        self.removed, self.need = removed, need

    def value(self, choice) -> int:
        return sum(r[j] for r, j in zip(self.removed, choice))

    def feasible(self, choice) -> bool:
        return self.value(choice) >= self.need

    def describe(self, choice) -> dict:
        return {"planned_removed_params": self.value(choice)}


class LatencyBudget:
    """A latency target: the predicted time (fixed part plus one table entry per layer, indexed by
    its attention and FFN levels) at most ``budget_ms``."""

    kind = "latency"

    def __init__(self, layers: list[tuple[int | None, int | None, np.ndarray]], fixed_ms: float, budget_ms: float):
        self.layers, self.fixed_ms, self.budget_ms = layers, fixed_ms, budget_ms

    def value(self, choice) -> float:
        return self.fixed_ms + sum(float(t[0 if a is None else choice[a], 0 if f is None else choice[f]])
                                   for a, f, t in self.layers)

    def feasible(self, choice) -> bool:   # (the tolerance only absorbs summation order)
        return self.value(choice) <= self.budget_ms * (1 + 1e-12)

    def describe(self, choice) -> dict:
        return {"planned_ms": self.value(choice)}


def budget_for(db, graph, target):
    """The budget every candidate must meet, priced as the DP prices it."""
    from . import ziplm as Z

    if not target.is_latency:
        need = graph.total_params - int(math.floor(target.value * graph.total_params))
        return ParamsBudget([[Z.removed_params(graph, s, lv) for lv in s.levels] for s in db.sublayers], need)
    from ..latency.table import layer_kinds

    table = target.latency
    kinds = layer_kinds(graph)
    dense_att = (graph.n_kv, graph.n_heads // graph.n_kv)
    by_layer: dict[int, dict[str, int]] = {}
    for s, sub in enumerate(db.sublayers):
        by_layer.setdefault(sub.layer, {})[sub.kind] = s
    fixed = table.base_ms + sum(table.layer_ms(kinds[i], dense_att, graph.intermediate)
                                for i in range(graph.n_layers) if i not in by_layer)
    layers = []
    for i in sorted(by_layer):
        a, f = by_layer[i].get("attention"), by_layer[i].get("ffn")
        att = [Z.level_config(db.sublayers[a], lv) for lv in db.sublayers[a].levels] if a is not None else [dense_att]
        ffn = ([Z.level_config(db.sublayers[f], lv) for lv in db.sublayers[f].levels] if f is not None
               else [graph.intermediate])
        times = np.array([[table.layer_ms(kinds[i], ac, fc) for fc in ffn] for ac in att])
        layers.append((a, f, times))
    return LatencyBudget(layers, fixed, target.latency_budget(graph))


# ---- the fitness model -----------------------------------------------------------------------------

class Assembler:
    """Candidates assembled on ``model`` itself (see the module docstring), scored by KL against the
    dense model on the first ``n_fit`` calibration sequences.  :meth:`restore` puts the dense
    weights back; use it in a ``finally``."""

    @torch.no_grad()
    def __init__(self, model, graph, db, calib: torch.Tensor, n_fit: int, *, damp: float, batch_size: int,
                 progress: bool):
        from ..calibration import Sequential
        from ..obs import dampen
        from .ziplm import _projections

        self.model, self.graph, self.db = model, graph, db
        self.runner = LayerRunner(model)
        self.batch_size = batch_size
        self.calib = calib
        self.n_fit = n_fit
        self.evaluations = 0
        self.tokens = 0
        self.params, self.transposed, self.dense, self.current = [], [], [], []
        by_layer: dict[int, list[int]] = {}
        for s, sub in enumerate(db.sublayers):
            o, down = _projections(model, sub.layer)
            proj = o if sub.kind == "attention" else down
            module = model.get_submodule(proj.weight.rpartition(".")[0])
            self.params.append(proj.weight)
            self.transposed.append(input_dim(module) == 0)
            self.dense.append(model.get_parameter(proj.weight).detach().clone())
            self.current.append(0)
            by_layer.setdefault(sub.layer, []).append(s)
        self.flags = {i: {"attention": True, "ffn": True} for i in range(graph.n_layers)}
        # dense Gram matrices of every database sublayer's projection input, all calibration sequences
        self.h = [None] * len(db.sublayers)
        seq = Sequential(model, calib, batch_size=batch_size)
        last = max(by_layer) if by_layer else -1
        bar = tqdm(range(last + 1), desc="ziplm evo grams", unit="layer", disable=not progress)
        for i in bar:
            if i not in by_layer:
                seq.advance(i)
                continue
            names = {s: self.params[s].rpartition(".")[0] for s in by_layer[i]}
            stats = seq.collect(i, sorted(set(names.values())), advance=True)
            for s, name in names.items():
                stats[name].check_finite(name)
                self.h[s] = dampen(stats[name].matrix(), damp).float()
        del seq
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes = 0
        # the dense reference on the fitness sequences
        vocab = model.get_output_embeddings().weight.shape[0]
        tokens = n_fit * calib.shape[1]
        self.keep_logprobs = tokens * vocab * 4 <= REFERENCE_BYTES
        self.reference = []
        for b in self._batches(list(range(n_fit))):
            hn = self._final_hidden(b, dense=True)
            if self.keep_logprobs:
                self.reference.append(torch.cat([F.log_softmax(self.runner.logits(c).float(), -1)
                                                 for c in hn.reshape(-1, hn.shape[-1]).split(HEAD_CHUNK)]))
            else:
                self.reference.append(hn.reshape(-1, hn.shape[-1]).clone())
        self.seq_rows = {}           # fitness sequence -> (batch, token rows) in the reference
        for k, b in enumerate(self._batches(list(range(n_fit)))):
            for pos, seq_id in enumerate(b):
                self.seq_rows[seq_id] = (k, slice(pos * calib.shape[1], (pos + 1) * calib.shape[1]))

    def _batches(self, ids: list[int]) -> list[list[int]]:
        return [ids[s:s + self.batch_size] for s in range(0, len(ids), self.batch_size)]

    def _final_hidden(self, ids: list[int], dense: bool = False) -> torch.Tensor:
        device = next(self.model.parameters()).device
        h = self.runner.embed(self.calib[ids].to(device))
        ctx = self.runner.context(h)
        for i in range(self.runner.n):
            f = {"attention": True, "ffn": True} if dense else self.flags[i]
            h = self.runner.layer(i, h, ctx, f["attention"], f["ffn"])
        return self.runner.final(h)

    def _refit(self, s: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ..obs import least_squares

        key = (s, j)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        sub, lv = self.db.sublayers[s], self.db.sublayers[s].levels[j]
        if sub.kind == "attention":
            hd = self.graph.head_dim
            cols = torch.tensor([h * hd + d for h in lv.query_heads for d in range(hd)])
        else:
            cols = torch.tensor(sub.ffn_channels(lv, self.graph.intermediate))
        w = self.dense[s].T if self.transposed[s] else self.dense[s]
        new = least_squares(w, self.h[s].double(), cols).float()
        self.cache[key] = (cols, new)
        self.cache_bytes += new.numel() * 4
        while self.cache_bytes > CACHE_BYTES and len(self.cache) > 1:
            _, (_, old) = self.cache.popitem(last=False)
            self.cache_bytes -= old.numel() * 4
        return cols, new

    @torch.no_grad()
    def assemble(self, choice: list[int]) -> None:
        """Write ``choice`` into the model (only the sublayers whose level changed)."""
        for s, j in enumerate(choice):
            sub = self.db.sublayers[s]
            lv = sub.levels[j]
            self.flags[sub.layer][sub.kind] = not lv.removed
            if j == self.current[s] or lv.removed:
                continue
            param = self.model.get_parameter(self.params[s])
            if j == 0:
                param.data.copy_(self.dense[s])
            else:
                cols, new = self._refit(s, j)
                full = torch.zeros(param.shape[::-1] if self.transposed[s] else param.shape, dtype=param.dtype,
                                   device=param.device)
                full[:, cols] = new.to(full)
                param.data.copy_(full.T if self.transposed[s] else full)
            self.current[s] = j

    @torch.no_grad()
    def fitness(self, choice: list[int], seqs: list[int]) -> float:
        """Mean per-token KL(dense || candidate) over the fitness sequences ``seqs``."""
        self.assemble(choice)
        total, count = 0.0, 0
        for b in self._batches(sorted(seqs)):
            hn = self._final_hidden(b)
            hn = hn.reshape(-1, hn.shape[-1])
            for pos, seq_id in enumerate(b):
                k, rows = self.seq_rows[seq_id]
                ref = self.reference[k][rows]
                mine = hn[pos * self.calib.shape[1]:(pos + 1) * self.calib.shape[1]]
                for c_ref, c_mine in zip(ref.split(HEAD_CHUNK), mine.split(HEAD_CHUNK)):
                    dense = (c_ref if self.keep_logprobs
                             else F.log_softmax(self.runner.logits(c_ref).float(), -1))
                    cand = F.log_softmax(self.runner.logits(c_mine).float(), -1)
                    total += float((dense.exp() * (dense - cand)).sum())
                    count += c_mine.shape[0]
        self.evaluations += 1
        self.tokens += count
        return total / count

    @torch.no_grad()
    def restore(self) -> None:
        for s, name in enumerate(self.params):
            self.model.get_parameter(name).data.copy_(self.dense[s])
            self.current[s] = 0
        self.cache.clear()
        self.cache_bytes = 0


# ---- the search ------------------------------------------------------------------------------------

def mutate(parent: list[int], db, budget, rng: random.Random) -> list[int] | None:
    """A level-switch child of ``parent`` that meets ``budget`` (repaired), or None."""
    child = list(parent)
    last = [len(s.levels) - 1 for s in db.sublayers]
    kinds = [s.kind for s in db.sublayers]
    lowered = set()
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        down = [s for s in range(len(child)) if child[s] > 0]
        if not down:
            break
        d = rng.choice(down)
        reach = max(1, last[d] // 8)
        k = min(rng.randint(1, reach), rng.randint(1, reach), child[d])
        child[d] -= k
        lowered.add(d)
        up = [s for s in range(len(child)) if s != d and kinds[s] == kinds[d] and child[s] < last[s]]
        if up:
            u = rng.choice(up)
            child[u] = min(last[u], child[u] + k)
    raised = {s for s in range(len(child)) if child[s] > parent[s]}
    while not budget.feasible(child):
        up = [s for s in range(len(child)) if s not in lowered and child[s] < last[s]]
        if not up:
            return None
        u = rng.choice(up)
        child[u] += 1
        raised.add(u)
    # spend the slack the switches and the repair leave (else it piles up over generations)
    others = [s for s in range(len(child)) if s not in raised and child[s] > 0]
    rng.shuffle(others)
    for s in others:
        child[s] -= 1
        if not budget.feasible(child):
            child[s] += 1
    return child


def stages(n_fit: int, offspring: int) -> list[tuple[int, int]]:
    """(sequences, survivors) of the selection stages before the final one (all ``n_fit`` sequences,
    one candidate): a 1/16 keeping a quarter, a 1/4 keeping one; stages that select nothing go."""
    out, alive = [], offspring
    for frac, keep in ((16, max(1, math.ceil(offspring / 4))), (4, 1)):
        n = max(1, n_fit // frac)
        if n >= n_fit or alive <= keep or (out and n <= out[-1][0]):
            continue
        out.append((n, keep))
        alive = keep
    return out


@torch.no_grad()
def refine(model, graph, db, target, start: list[int], calib: torch.Tensor, *, generations: int, offspring: int,
           seconds: float, tokens: int, seed: int, damp: float, batch_size: int, progress: bool = True,
           record: list | None = None) -> tuple[list[int], dict]:
    """Refine ``start`` (the DP's level choice) by the evolutionary search.  Returns the best choice
    and the ``search`` report.  ``record`` (a list) receives ``(choice, sequences, fitness)`` of
    every evaluation.  The model is restored."""
    began = time.perf_counter()
    budget = budget_for(db, graph, target)
    if not budget.feasible(start):
        raise ValueError("the evolutionary search needs a start that meets the budget")   # the DP guarantees it
    n_fit = min(calib.shape[0], max(1, math.ceil(tokens / calib.shape[1])))
    everything = list(range(n_fit))
    rng = random.Random(seed)
    asm = Assembler(model, graph, db, calib, n_fit, damp=damp, batch_size=batch_size, progress=progress)
    plan_stages = stages(n_fit, offspring)
    try:
        def score(choice, seqs):
            f = asm.fitness(choice, seqs)
            if record is not None:
                record.append((list(choice), list(seqs), f))
            return f

        parent = list(start)
        best = fitness_dp = score(parent, everything)
        setup = time.perf_counter() - began
        history, accepted, done, stopped = [], 0, 0, "generations"
        bar = tqdm(range(generations), desc="ziplm evo", unit="gen", disable=not progress)
        for _ in bar:
            if time.perf_counter() - began > seconds:
                stopped = "seconds"
                break
            children, tries = [], 0
            while len(children) < offspring and tries < 50 * offspring:
                tries += 1
                child = mutate(parent, db, budget, rng)
                if child is not None and child != parent and child not in children:
                    children.append(child)
            if not children:
                stopped = "no feasible child"
                break
            alive, cut = children, False
            for n, keep in plan_stages:
                if len(alive) <= keep:
                    continue
                seqs = rng.sample(everything, n)
                scored = []
                for c in alive:
                    if time.perf_counter() - began > seconds:
                        cut = True
                        break
                    scored.append((score(c, seqs), len(scored), c))
                if cut:
                    break
                alive = [c for _, _, c in sorted(scored)[:keep]]
            finals = []
            for c in alive if not cut else []:
                if time.perf_counter() - began > seconds:
                    cut = True
                    break
                finals.append((score(c, everything), len(finals), c))
            if cut:
                stopped = "seconds"
                break
            f, _, c = min(finals)
            if f < best:
                parent, best = c, f
                accepted += 1
            done += 1
            history.append(best)
            bar.set_postfix(kl=f"{best:.4g}")
        report = {"method": "evo", "generations": done, "evaluations": asm.evaluations,
                  "seconds": round(time.perf_counter() - began, 2), "setup_seconds": round(setup, 2),
                  "fitness": "mean per-token KL(dense || candidate), nats; least-squares re-fits on dense Grams",
                  "fitness_dp": fitness_dp, "fitness_best": best, "history": history, "accepted": accepted,
                  "stopped": stopped, "offspring": offspring, "seed": seed,
                  "fitness_tokens": n_fit * calib.shape[1],
                  "stage_tokens": [n * calib.shape[1] for n, _ in plan_stages] + [n_fit * calib.shape[1]],
                  "evaluated_tokens": asm.tokens, "budget": budget.kind,
                  "changed_sublayers": sum(a != b for a, b in zip(start, parent))}
        return parent, report
    finally:
        asm.restore()
