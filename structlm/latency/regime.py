"""How a model is run when it is timed: the *regime* of a latency table, and the one timed call.

A regime names the device, dtype, thread count, the phase (``prefill``: a [batch, seq] prompt,
logits of the last position only, as ``generate`` does; ``decode``: one new token per sequence
with a KV cache already holding ``seq`` tokens) and the execution (``eager``: what
``from_pretrained`` + ``generate`` gives; ``cudagraph``, on a GPU: the forward captured once as a
CUDA graph and replayed, as serving engines run small batches, so the host launches no kernels).
The same call times the probes a table is built from and the whole models a table is checked
against, so the two measure the same thing.

The statistic is robust to a shared machine: every variant is timed in pairs with a reference
(:func:`time_paired`), so what is compared was measured seconds apart, under the same load.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
from dataclasses import asdict, dataclass

import torch

PHASES = ("prefill", "decode")
EXECUTIONS = ("eager", "cudagraph")


class LatencyError(ValueError):
    """A latency table or regime that cannot be used as asked."""


@dataclass(frozen=True)
class Regime:
    phase: str = "prefill"
    batch: int = 1
    seq: int = 128
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None          # CPU threads (None on a GPU)
    execution: str = "eager"

    def __post_init__(self):
        if self.phase not in PHASES:
            raise LatencyError(f"unknown regime {self.phase!r}; use one of {', '.join(PHASES)}")
        if self.execution not in EXECUTIONS:
            raise LatencyError(f"execution {self.execution!r} is not measured by this version; use "
                               f"{', '.join(EXECUTIONS)}")
        if self.execution == "cudagraph" and not str(self.device).startswith("cuda"):
            raise LatencyError(f"execution cudagraph needs a CUDA device (this regime is on {self.device}); "
                               "use --device cuda on the GPU machine, or execution eager")
        if self.batch < 1 or self.seq < 1:
            raise LatencyError(f"batch and seq must be at least 1 (got batch={self.batch}, seq={self.seq})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LatencyError(f"dtype {self.dtype!r}: use float32, bfloat16 or float16")

    @classmethod
    def here(cls, phase="prefill", batch=1, seq=128, device="cpu", dtype="float32", threads=None,
             execution="eager") -> "Regime":
        """The regime on this machine (threads: torch's current count on CPU)."""
        dev = torch.device(device)
        if dev.type == "cpu":
            threads = int(threads or torch.get_num_threads())
        else:
            threads = None
        return cls(phase, int(batch), int(seq), str(dev), dtype, threads, execution)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"{self.device}" + (f", {self.threads} threads" if self.threads else "")
        what = (f"prefill {self.batch}x{self.seq}" if self.phase == "prefill"
                else f"decode batch {self.batch}, KV cache {self.seq}")
        return f"{what}, {self.dtype}, {self.execution}, {where}"

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


def device_name(device: str) -> str:
    """A human-readable name of the hardware behind ``device`` (the GPU's name, or the CPU's)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name


def software() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _timer(device: torch.device):
    from ..evaluate import _timer as timer

    return timer(device)


class TimedCall:
    """One timed forward of ``module`` in ``regime``: ``prepare()`` (untimed: inputs, a fresh copy of
    the prefilled KV cache) then ``run()``.  ``stack=True`` runs the decoder stack alone
    (``model.model`` on input embeddings: what the probes of a table measure); else the whole
    causal LM from token ids, logits of the last position only.

    With ``execution="cudagraph"`` the call is captured once (after warm-up runs on a side stream)
    and ``run()`` replays the graph.  A decode step replays from the same prefilled cache: the
    step's cache update concatenates into new tensors of the graph's memory pool and leaves the
    captured cache as it was, so every replay is the same step."""

    def __init__(self, model, regime: Regime, stack: bool = False, seed: int = 0):
        self.regime, self.stack = regime, stack
        self.model = model
        self.body = model.model if stack else model
        config = model.config.get_text_config()
        device = torch.device(regime.device)
        g = torch.Generator().manual_seed(seed)
        b, s = regime.batch, regime.seq
        if stack:
            hidden = config.hidden_size
            self.prompt = {"inputs_embeds": torch.randn(b, s, hidden, generator=g).to(device, regime.torch_dtype)}
            self.step = {"inputs_embeds": torch.randn(b, 1, hidden, generator=g).to(device, regime.torch_dtype)}
            self.extra = {}
        else:
            vocab = config.vocab_size
            self.prompt = {"input_ids": torch.randint(0, vocab, (b, s), generator=g).to(device)}
            self.step = {"input_ids": torch.randint(0, vocab, (b, 1), generator=g).to(device)}
            self.extra = {"logits_to_keep": 1}
        self.layers = int(config.num_hidden_layers)
        self._cache = None
        if regime.phase == "decode" and self.layers:
            with torch.no_grad():
                self._cache = self.body(**self.prompt, use_cache=True, **self.extra).cache
        self._args = None
        self._graph = None
        if regime.execution == "cudagraph":
            self._capture()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(3):
                self._eager_prepare()
                self.body(**self._args)
        torch.cuda.current_stream().wait_stream(stream)
        self._eager_prepare()
        # the graph reads its inputs at the addresses they had when it was captured: keep every input
        # tensor alive (the cache object's update rebinds its keys/values to new tensors, which would
        # free the captured ones)
        self._static = self._args
        self._alive = _tensors(self._static)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._static_out = self.body(**self._static)
        self._graph = graph
        self._args = None

    def prepare(self) -> None:
        if self._graph is None:
            self._eager_prepare()

    def _eager_prepare(self) -> None:
        if self.regime.phase == "prefill":
            self._args = dict(self.prompt, use_cache=True, **self.extra)
        elif self._cache is None:           # no layers, no cache: the fixed rest of one token
            self._args = dict(self.step, use_cache=False, **self.extra)
        else:
            self._args = dict(self.step, cache=copy.deepcopy(self._cache), use_cache=True, **self.extra)

    @torch.no_grad()
    def run(self) -> None:
        if self._graph is not None:
            self._graph.replay()
            return
        self.body(**self._args)
        self._args = None


def _tensors(obj, depth: int = 0) -> list:
    """Every tensor reachable from ``obj`` through containers and object attributes (a few levels)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 4:
        return []
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return []
    return [t for item in items for t in _tensors(item, depth + 1)]


def time_paired(calls: dict, reference: str, regime: Regime, rounds: int = 7, reps: int = 2, warmup: int = 1,
                progress=None) -> dict:
    """Every TimedCall in ``calls`` timed against the ``reference`` call, pair by pair.

    The machines this runs on change speed by tens of percent from one second to the next
    (shared hosts, frequency scaling), so an absolute time measured now and one measured a
    minute later do not compare.  Each round runs the reference, then each call followed by
    the reference again (the calls' order reversed every other round); a call's ratio in that
    round is its time over the mean of the two reference runs around it, which the slow phases
    hit alike.  Every sample is the fastest of ``reps`` consecutive runs.  A call's ``ratio`` is
    the median over rounds, its ``ms`` the ratio times the reference's fastest sample (the
    machine's undisturbed speed).  Returns {name: {"ms", "ratio", "spread"}} (spread: the
    inter-quartile range of the ratios, relative)."""
    timed = _timer(torch.device(regime.device))

    def sample(call):
        best = math.inf
        for _ in range(reps):
            call.prepare()
            best = min(best, timed(call.run))
        return best

    for call in calls.values():
        for _ in range(warmup):
            call.prepare()
            call.run()
    ref = calls[reference]
    names = [name for name in calls if name != reference]
    ref_samples, ratios = [], {name: [] for name in names}
    for r in range(rounds):
        before = sample(ref)
        ref_samples.append(before)
        for name in (names if r % 2 == 0 else names[::-1]):
            t = sample(calls[name])
            after = sample(ref)
            ref_samples.append(after)
            ratios[name].append(2 * t / (before + after))
            before = after
            if progress is not None:
                progress.update()
    ref_ms = min(ref_samples)
    out = {reference: {"ms": ref_ms, "ratio": 1.0, "spread": 0.0}}
    for name, got in ratios.items():
        q1, med, q3 = statistics.quantiles(got, n=4, method="inclusive") if len(got) > 1 else (got[0],) * 3
        out[name] = {"ms": med * ref_ms, "ratio": med, "spread": (q3 - q1) / med if med else 0.0}
    return out


def measure_models(models: dict, regime: Regime, reference: str = "dense", rounds: int = 15, reps: int | None = None,
                   progress: bool = True) -> dict:
    """End-to-end latency of whole models in ``regime``, each paired against ``reference`` (the dense
    model): {name: {"ms", "ratio", "spread", "speedup"}}."""
    from tqdm.auto import tqdm

    if reference not in models:
        raise LatencyError(f"the reference model {reference!r} is not among {sorted(models)}")
    reps = reps or (2 if regime.phase == "prefill" else 5)
    calls = {name: TimedCall(m, regime) for name, m in models.items()}
    with tqdm(total=rounds * (len(calls) - 1), desc=f"timing ({regime.phase})", disable=not progress) as bar:
        out = time_paired(calls, reference, regime, rounds=rounds, reps=reps, progress=bar)
    for v in out.values():
        v["speedup"] = 1.0 / v["ratio"]
    return out
