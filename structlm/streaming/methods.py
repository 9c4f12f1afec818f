"""Which methods run in streaming mode, and how: each streamable method is split into the same
steps as its in-memory function (options, per-layer scores, allocation, per-layer weight updates),
and these steps are the methods' own functions, so both modes compute the same plan.

A method here scores layer ``i`` from that layer's weights and the statistics of the inputs its
modules received while the (dense) calibration activations ran through it; the allocation
(possibly global across layers) runs once every layer is scored.  Hence two passes over the
checkpoint: pass 1 scores, pass 2 shrinks (see docs/scale.md).

The reconstruction methods (ziplm, modegpt) add a calibration pass between the two: after the
allocation, the calibration activations run again from the embeddings through each layer *as the
method changes it* (:class:`structlm.calibration.Sequential`, as in memory), the layer's new
weights are written to a scratch file in the output folder, and pass 3 shrinks each layer with
its own new weights.  Pass 1 runs on a Sequential as well (``sequential``), so both passes feed
every layer exactly what the in-memory method feeds it."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import StreamError

# why the others cannot stream, and what to use instead
REFUSED = {
    "finercut": "its greedy search scores every candidate removal by running the whole network to its output "
                "(each candidate needs every later layer resident)",
    "sleb": "its greedy search scores every candidate block by the whole network's calibration perplexity "
            "(each candidate needs every later layer resident)",
    "llm_pruner": "its Taylor importance needs a backward pass through the whole network",
}
SUPPORTED = ("magnitude", "wanda_sp", "flap", "ziplm", "modegpt", "shortgpt", "shortgpt_angular", "last_blocks")


def refusal(method: str) -> str:
    return (f"--stream: {method} cannot run in streaming mode: {REFUSED[method]}. Prune in memory (without "
            f"--stream, the model must fit), or stream with {', '.join(SUPPORTED)}")


class StreamMethod:
    """One method's streaming steps.  ``needs_activations``: pass 1 runs the calibration
    activations through each layer; ``needs_weights``: pass 1 reads each layer's weights."""

    name = ""
    needs_activations = False
    needs_weights = True
    sequential = False      # pass 1 runs on a Sequential (score_sequential) instead of run_layer
    calibrates = False      # a calibration pass after the allocation computes per-layer weight updates

    def __init__(self, model, graph, target, options: dict):
        self.graph, self.target = graph, target
        self.stats = None          # input statistics (parse() creates them where the method reads some)
        self.compensate = False
        self.opts = self.parse(model, graph, target, dict(options))

    @property
    def layers(self) -> list[int]:
        return self.opts["layers"]

    @property
    def batch_size(self) -> int:
        return int(self.opts.get("batch_size", 4))

    def stat_modules(self, model, i: int) -> list[str]:
        return []

    def run_layer(self, runner, i: int, h: list) -> list:
        """Layer ``i`` on every batch of activations ``h`` (methods that score the pass override it)."""
        return [runner.layer(i, x, runner.context(x)) for x in h]

    def score_layer(self, model, i: int) -> dict:
        raise NotImplementedError

    def score_sequential(self, model, seq, i: int) -> dict:
        """Pass 1 of a ``sequential`` method: layer ``i`` on the states of ``seq`` (which it moves on)."""
        raise NotImplementedError

    def plan(self, model, scores: dict, calib_shape):
        raise NotImplementedError

    def layer_updates(self, model, plan, i: int) -> None:
        """Weight updates of layer ``i`` into ``plan.updates`` (layer ``i`` resident)."""

    def future_updates(self, model, plan) -> dict:
        """Names and shapes of every update :meth:`layer_updates` will add (zeros), read from
        shapes only: the shrink of an early layer must know which new biases the config gets."""
        return {}


def _no_hidden(method: str, opts: dict) -> None:
    if opts.get("prune_hidden"):
        raise StreamError(f"--stream: {method} with --prune-hidden is not supported in streaming mode (the hidden "
                          f"channels' scores sum over every layer and the embeddings); drop --prune-hidden or "
                          f"prune in memory")


class Magnitude(StreamMethod):
    name = "magnitude"

    def parse(self, model, graph, target, options):
        from ..methods.magnitude import magnitude_options

        opts = magnitude_options(model, graph, target, options)
        _no_hidden(self.name, opts)
        return opts

    def score_layer(self, model, i):
        from ..methods.magnitude import magnitude_scores

        o = self.opts
        return magnitude_scores(model, self.graph, [i], p=o["p"], gqa=o["gqa"], aggregate=o["aggregate"])

    def plan(self, model, scores, calib_shape):
        from ..methods.magnitude import magnitude_plan

        return magnitude_plan(self.graph, self.target, scores, self.opts)


class WandaSP(StreamMethod):
    name = "wanda_sp"
    needs_activations = True

    def parse(self, model, graph, target, options):
        from ..methods._width import InputStats
        from ..methods.wanda_sp import stat_modules, wanda_sp_options

        opts = wanda_sp_options(model, graph, target, options)
        _no_hidden(self.name, opts)
        self.stats = InputStats(model, stat_modules(model, graph, opts["layers"], opts["scope"]))
        return opts

    def stat_modules(self, model, i):
        from ..methods.wanda_sp import stat_modules

        return stat_modules(model, self.graph, [i], self.opts["scope"]) if i in self.layers else []

    def score_layer(self, model, i):
        from ..methods.wanda_sp import wanda_sp_scores

        o = self.opts
        return wanda_sp_scores(model, self.graph, None, [i], gqa=o["gqa"], scope=o["scope"], aggregate=o["aggregate"],
                               stats=self.stats)

    def plan(self, model, scores, calib_shape):
        from ..methods.wanda_sp import wanda_sp_plan

        return wanda_sp_plan(self.graph, self.target, scores, self.opts, calib_shape)


class Flap(StreamMethod):
    name = "flap"
    needs_activations = True

    def parse(self, model, graph, target, options):
        from ..methods._width import InputStats
        from ..methods.flap import flap_options, stat_modules

        opts = flap_options(model, graph, target, options)
        self.stats = InputStats(model, stat_modules(model, opts["layers"]))
        return opts

    def stat_modules(self, model, i):
        from ..methods.flap import stat_modules

        return stat_modules(model, [i]) if i in self.layers else []

    def score_layer(self, model, i):
        from ..methods.flap import flap_scores

        o = self.opts
        scores, _, _ = flap_scores(model, self.graph, None, [i], gqa=o["gqa"], metric=o["metric"], stats=self.stats)
        return scores

    def plan(self, model, scores, calib_shape):
        from ..methods.flap import flap_plan

        plan, info, self.compensate = flap_plan(model, self.graph, self.target, scores, self.opts)
        info.update(calibration=list(calib_shape))
        return plan, info

    def layer_updates(self, model, plan, i):
        from ..methods.flap import compensate_biases

        if self.compensate and i in self.layers:
            compensate_biases(model, self.graph, plan, self.stats, [i])

    def future_updates(self, model, plan):
        import copy

        from ..methods._width import input_dim
        from ..methods.flap import compensate_biases

        if not self.compensate:
            return {}

        class MetaMeans:   # the compensation run on shapes only (meta weights, meta means)
            def mean(_, module):
                m = model.get_submodule(module)
                return torch.empty(m.weight.shape[input_dim(m)], dtype=torch.float64, device="meta")
        probe = copy.copy(plan)
        probe.updates = {}
        compensate_biases(model, self.graph, probe, MetaMeans(), self.layers)
        return {name: torch.zeros(value.shape, dtype=torch.float32) for name, value in probe.updates.items()}


class ShortGPT(StreamMethod):
    """ShortGPT's Block Influence (or the sublayers' angular distances): summed per layer while
    the dense activations pass through it, in the in-memory order (batch by batch)."""

    needs_activations = True

    def __init__(self, name, model, graph, target, options):
        from .. import methods
        from ..methods import reject_unknown_options

        self.name = name
        options = dict(options)
        batch_size = int(options.pop("batch_size", 8))
        reject_unknown_options(name, options, methods.get(name))
        self.graph, self.target = graph, target
        self.opts = {"layers": list(range(graph.n_layers)), "batch_size": batch_size}
        self.stats = None
        self.compensate = False
        self.sums: dict = {}
        self.tokens = 0
        self.started = None

    def run_layer(self, runner, i, h):
        import time

        from ..methods.shortgpt import block_step, sublayer_step

        if self.started is None:
            self.started = time.perf_counter()
        step = block_step if self.name == "shortgpt" else sublayer_step
        out = []
        for x in h:
            values, y = step(runner, i, x, runner.context(x))
            for unit, value in values.items():
                self.sums[unit] = self.sums.get(unit, 0.0) + value
            out.append(y)
            if i == 0:
                self.tokens += x.shape[0] * x.shape[1]
        return out

    def score_layer(self, model, i):
        return {}

    def plan(self, model, scores, calib_shape):
        import time

        from ..methods.shortgpt import shortgpt_angular_plan, shortgpt_plan

        from .. import distributed

        seconds = time.perf_counter() - (self.started or time.perf_counter())
        n = self.graph.n_layers
        self.sums, self.tokens = distributed.reduce_sums(self.sums, self.tokens)   # over the ranks (torchrun)
        if self.name == "shortgpt":
            return shortgpt_plan(self.graph, self.target, [self.sums[(i, "block")] / self.tokens for i in range(n)],
                                 seconds)
        angular = {k: [self.sums[(i, k)] / self.tokens for i in range(n)] for k in ("attention", "ffn")}
        return shortgpt_angular_plan(self.graph, self.target, angular, seconds)


class WeightFree(StreamMethod):
    """A method that reads no weights and no activations (last_blocks): run as it is on the skeleton."""

    needs_weights = False

    def __init__(self, name, model, graph, target, options):
        self.name = name
        self.graph, self.target, self.options = graph, target, dict(options)
        self.opts = {"layers": []}
        self.stats = None
        self.compensate = False

    def plan(self, model, scores, calib_shape):
        from .. import methods

        return methods.get(self.name)(model, self.graph, self.target, None, **self.options)


def _runner_check(name: str, model) -> None:
    from ..methods._layers import LayerRunner, UnsupportedRunnerError

    try:
        LayerRunner(model)
    except UnsupportedRunnerError as e:
        raise StreamError(f"--stream: {name} runs the calibration activations layer by layer and {e}; "
                          f"magnitude and last_blocks stream without activations") from None


class Calibrating(StreamMethod):
    """A method whose weight updates come from a calibration pass over the pruned layers (pass 2,
    after the allocation): :meth:`begin` sets it up on the pass's model and Sequential,
    :meth:`calibrate_layer` runs layer ``i`` (the only one resident) and returns its updates,
    :meth:`finish` returns the finished (plan, info)."""

    needs_activations = True
    sequential = True
    calibrates = True

    @property
    def propagate(self) -> bool:
        return True

    def score_layer(self, model, i):
        return {}

    def calibration_end(self, plan) -> int:
        """Layers ``0 .. end - 1`` go through the calibration pass (the later ones change nothing)."""
        return self.graph.n_layers


class ZipLM(Calibrating):
    """ZipLM: pass 1 builds the level database layer by layer (dense inputs, as in memory), the
    dynamic programme picks the levels from it (small: the error tables and the FFN orders), and
    the calibration pass re-fits each pruned layer on the inputs of the pruned and re-fitted earlier
    layers (or the dense ones, ``sequential=False``), as :func:`structlm.methods.ziplm.reconstruct`."""

    name = "ziplm"

    def parse(self, model, graph, target, options):
        from ..methods.ziplm import LevelDatabase, _options, check_target

        opts = _options(graph, options)
        if opts["evo"]["search"] == "evo":
            raise StreamError("--stream: ziplm -O search=evo scores every candidate plan on the whole assembled "
                              "model, which streaming never holds; use -O search=dp (the default) or prune in memory "
                              "(without --stream)")
        check_target(target)
        _runner_check(self.name, model)
        db = opts["levels"]
        if isinstance(db, (str, Path)):
            db = LevelDatabase.load(db)
        if db is not None:
            db.check_model(graph)
        self.db, self.subs, self.rows, self.skeleton = db, [], [], model
        self.needs_weights = db is None        # a given level database: no scoring pass
        return opts

    @property
    def propagate(self) -> bool:
        return self.opts["sequential"]

    def score_sequential(self, model, seq, i):
        from ..methods.ziplm import layer_levels

        if i in set(self.layers):
            self.subs += layer_levels(model, self.graph, seq, i, damp=self.opts["damp"], ffn_step=self.opts["ffn_step"])
        else:
            seq.advance(i)
        return {}

    def plan(self, model, scores, calib_shape):
        from ..methods.ziplm import LevelDatabase, allocate_levels, fingerprint, levels_meta, plan_from_choice

        o = self.opts
        if self.db is None:
            self.db = LevelDatabase(fingerprint(self.graph), self.subs, levels_meta(o["damp"], o["ffn_step"], calib_shape))
        if o["save_levels"]:
            self.db.save(o["save_levels"])
        self.choice, info = allocate_levels(self.db, self.graph, self.target, allocation=o["allocation"],
                                            buckets=o["buckets"], error_scale=o["error_scale"])
        info["search"] = {"method": "dp"}
        self.info, self.calib_shape = info, calib_shape
        return plan_from_choice(self.db, self.graph, self.choice, o["align"]), info

    def begin(self, model, seq, plan):
        from ..methods.ziplm import Reconstruction

        self.rec = Reconstruction(model, self.graph, plan, seq, damp=self.opts["damp"], sequential=self.opts["sequential"])

    def calibration_end(self, plan):
        from ..methods.ziplm import Reconstruction

        probe = Reconstruction(self.skeleton, self.graph, plan, None)
        todo = [i for i in range(self.graph.n_layers) if probe.todo(i)]
        return max(todo) + 1 if todo else 0

    def calibrate_layer(self, model, i):
        row = self.rec.layer(i)
        if row is not None:
            self.rows.append(row)
        updates = {k: v.cpu() for k, v in self.rec.updates.items()}
        self.rec.updates.clear()
        self.rec.restore()
        return updates

    def finish(self, plan):
        from ..methods.ziplm import finish_info

        self.rec = None   # its model and calibration states are not needed by the shrink pass
        done = {row["layer"] for row in self.rows}   # the layers past the last re-fitted one: rows as in memory
        rows = self.rows + [{"layer": i} for i in range(self.graph.n_layers)
                            if i not in done and i not in set(plan.removed_blocks)]
        rows.sort(key=lambda r: r["layer"])
        return plan, finish_info(self.info, self.db, self.choice, self.opts, self.calib_shape, rows)


class MoDeGPT(Calibrating):
    """MoDeGPT: pass 1 computes the block importance (dense inputs), the allocation solves the
    per-layer compressions from it (shapes only), and the calibration pass decomposes each layer on
    the inputs of the compressed earlier layers, as :func:`structlm.methods.modegpt.compress`; the
    plan's kept channels are known only then (they come from each layer's correlations)."""

    name = "modegpt"

    def parse(self, model, graph, target, options):
        import time

        from ..methods.modegpt import _options, check_target

        self.started = time.perf_counter()
        opts, self.modules, self.notes = _options(graph, options)
        check_target(target, self.modules)
        _runner_check(self.name, model)
        self.importance, self.layers_, self.rows = [], {}, []
        self.needs_weights = opts["allocation"] == "bi"    # uniform: no importance pass
        return opts

    @property
    def layers(self):
        return list(range(self.graph.n_layers))

    def score_sequential(self, model, seq, i):
        from ..methods.modegpt import layer_importance

        self.importance.append(layer_importance(seq, i))
        return {}

    def plan(self, model, scores, calib_shape):
        from ..methods.modegpt import budget_for, check_importance, solve_phi

        if self.opts["allocation"] == "bi":
            check_importance(self.importance)
        else:
            self.importance = [0.0] * self.graph.n_layers
        self.budget = budget_for(self.graph, self.target)
        self.phi_avg, self.phis, self.counts = solve_phi(self.graph, self.importance, self.budget, self.opts,
                                                         self.modules, self.target)
        self.calib_shape = calib_shape
        return None, {}

    def calibration_end(self, plan):
        g, m = self.graph, self.modules
        changed = [i for i, c in enumerate(self.counts)   # the conditions of Compressor.layer
                   if ("ffn" in m and c["ffn"] < g.intermediate) or ("vo" in m and c["v"] < g.head_dim)
                   or ("qk" in m and c["qk"] < self._qk_units(i))]
        return max(changed) + 1 if changed else 0

    def _qk_units(self, i):
        g = self.graph
        return g.channel_group("qk_channel", i, 0).count if g.groups_of("qk_channel", i) else 0

    def begin(self, model, seq, plan):
        from ..methods.modegpt import Compressor

        self.comp = Compressor(model, self.graph, seq, self.counts, self.modules, self.opts)

    def calibrate_layer(self, model, i):
        from ..methods.modegpt import layers_plan

        lp, row = self.comp.layer(i)
        self.layers_[i] = lp
        self.rows.append(row)
        updates = {k: v.cpu() for k, v in self.comp.updates(layers_plan({i: lp}, self.graph, self.opts["align"])).items()}
        self.comp.restore()
        return updates

    def finish(self, plan):
        from ..methods.modegpt import layers_plan, method_info

        self.comp = None   # its model and calibration states are not needed by the shrink pass
        for i in range(len(self.rows), self.graph.n_layers):   # past the last compressed layer: rows as in memory
            c = self.counts[i]
            self.rows.append({"layer": i, "ffn_kept": c["ffn"], "qk_kept": c["qk"], "v_kept": c["v"]})
        plan = layers_plan(self.layers_, self.graph, self.opts["align"])
        return plan, method_info(self.target, self.opts, self.modules, self.notes, self.budget, self.phi_avg, self.phis,
                                 self.importance, self.rows, self.calib_shape, self.started)


def stream_method(name: str, model, graph, target, options: dict) -> StreamMethod:
    """The streaming steps of method ``name``, options checked (or the one-line refusal)."""
    from .. import methods

    key = methods.canonical_name(name)
    methods.get(key)   # unknown names: the registry's error
    if key in REFUSED:
        raise StreamError(refusal(key))
    classes = {"magnitude": Magnitude, "wanda_sp": WandaSP, "flap": Flap, "ziplm": ZipLM, "modegpt": MoDeGPT}
    if key in ("shortgpt", "shortgpt_angular"):
        return ShortGPT(key, model, graph, target, options)
    if key == "last_blocks":
        return WeightFree(key, model, graph, target, options)
    if key not in classes:
        raise StreamError(f"--stream: {key} is not supported in streaming mode; stream with {', '.join(SUPPORTED)}")
    return classes[key](model, graph, target, options)
