"""Which methods run in streaming mode, and how: each streamable method is split into the same
steps as its in-memory function (options, per-layer scores, allocation, per-layer weight updates),
and these steps are the methods' own functions, so both modes compute the same plan.

A method here scores layer ``i`` from that layer's weights and the statistics of the inputs its
modules received while the (dense) calibration activations ran through it; the allocation
(possibly global across layers) runs once every layer is scored.  Hence two passes over the
checkpoint: pass 1 scores, pass 2 shrinks (see docs/scale.md)."""

from __future__ import annotations

import torch

from .checkpoint import StreamError

# why the others cannot stream, and what to use instead
REFUSED = {
    "finercut": "its greedy search scores every candidate removal by running the whole network to its output "
                "(each candidate needs every later layer resident)",
    "sleb": "its greedy search scores every candidate block by the whole network's calibration perplexity "
            "(each candidate needs every later layer resident)",
    "llm_pruner": "its Taylor importance needs a backward pass through the whole network",
    "ziplm": "it is layer-wise (per-layer OBS levels and sequential reconstruction) but not yet wired into "
             "streaming mode",
    "modegpt": "it is layer-wise (per-layer Gram matrices) but not yet wired into streaming mode",
}
SUPPORTED = ("magnitude", "wanda_sp", "flap", "shortgpt", "shortgpt_angular", "last_blocks")


def refusal(method: str) -> str:
    return (f"--stream: {method} cannot run in streaming mode: {REFUSED[method]}. Prune in memory (without "
            f"--stream, the model must fit), or stream with {', '.join(SUPPORTED)}")


class StreamMethod:
    """One method's streaming steps.  ``needs_activations``: pass 1 runs the calibration
    activations through each layer; ``needs_weights``: pass 1 reads each layer's weights."""

    name = ""
    needs_activations = False
    needs_weights = True

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


def stream_method(name: str, model, graph, target, options: dict) -> StreamMethod:
    """The streaming steps of method ``name``, options checked (or the one-line refusal)."""
    from .. import methods

    key = methods.canonical_name(name)
    methods.get(key)   # unknown names: the registry's error
    if key in REFUSED:
        raise StreamError(refusal(key))
    classes = {"magnitude": Magnitude, "wanda_sp": WandaSP, "flap": Flap}
    if key in ("shortgpt", "shortgpt_angular"):
        return ShortGPT(key, model, graph, target, options)
    if key == "last_blocks":
        return WeightFree(key, model, graph, target, options)
    if key not in classes:
        raise StreamError(f"--stream: {key} is not supported in streaming mode; stream with {', '.join(SUPPORTED)}")
    return classes[key](model, graph, target, options)
