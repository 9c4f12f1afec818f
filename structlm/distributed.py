"""Data-parallel calibration on ``torch.distributed`` (``torchrun --nproc_per_node N -m structlm.cli prune ...``).

Every rank loads the model and draws the *same* calibration samples (seeded), then runs a
contiguous share of them: :func:`shard` cuts the samples into the method's batches and gives each
rank a run of whole batches, so every batch is the one a single process would run (same samples,
same shapes, same kernels).  Whatever a method accumulates over the samples (Gram matrices, input
sums and squared sums, cosine and loss sums, gradients) is summed over the ranks by the helpers
here *before any decision*: :func:`reduce_input_stats`, :func:`reduce_grams`, :func:`reduce_floats`,
:func:`reduce_tensors`.  Averages are always reduced as sums with their token counts.  Reduction
is ``reduce`` to rank 0 then ``broadcast``, so every rank holds bit-identical totals and takes the
same decisions (the same plan, the same number of later collective calls).  What differs from one
process is only the order of the float64 (float32 for LLM-Pruner's gradients) sums over batches.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) nothing here does anything:
:func:`world_size` is 1, :func:`shard` returns its input and the reductions return theirs.

Only rank 0 writes and prints (:func:`quiet_other_ranks`); an error on any rank is printed once
(:func:`report_error`), and a rank waiting in a collective for a peer that failed stops with a
one-line :class:`DistributedError` naming the peer's error.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import sys

import torch

_STATE: dict = {"error_stream": None, "run": 0}
_ERROR_KEY = "structlm/error/{run}/"
BUCKET = 1 << 25          # elements per reduced buffer (256 MB of float64)


class DistributedError(ValueError):
    """A data-parallel run that cannot go on (a peer failed, or a method or option that does not
    run on several ranks)."""


# ---- who am I ------------------------------------------------------------------------------

def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) with WORLD_SIZE > 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str = "cpu") -> str:
    """Initialise the process group from the environment torchrun sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): gloo for ``device`` cpu, nccl for cuda (each rank on
    ``cuda:LOCAL_RANK``).  Returns the device this rank computes on.  A no-op without torchrun."""
    import torch.distributed as dist

    if not launched():
        return device
    _STATE["run"] += 1   # errors are posted per command (a process may run several: tests)
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise DistributedError(f"data-parallel calibration runs on cpu (gloo) or cuda (nccl), not --device {device}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise DistributedError(f"torchrun started local rank {local} with --device cuda, but this machine has "
                                   f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s); use "
                                   f"--nproc_per_node at most the GPU count, or --device cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        kwargs = {"device_id": torch.device(device)} if kind == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60), **kwargs)
        atexit.register(finish)   # at exit, not per command: a rank that is done waits for no one
    return device


def finish() -> None:
    """Tear the process group down (at the end of a run; harmless when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks() -> None:
    """On ranks other than 0: progress bars, prints and warnings go nowhere; errors (and
    tracebacks of unexpected ones) still reach the real stderr."""
    if is_main() or _STATE["error_stream"] is not None:
        return
    import traceback
    import warnings

    _STATE["error_stream"] = sys.stderr
    devnull = open(os.devnull, "w")
    sys.stdout = devnull
    sys.stderr = devnull
    warnings.simplefilter("ignore")
    real = _STATE["error_stream"]
    sys.excepthook = lambda kind, value, tb: traceback.print_exception(kind, value, tb, file=real)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def error_stream():
    """Where a one-line error goes (the real stderr, also on quieted ranks)."""
    return _STATE["error_stream"] or sys.stderr


def refuse(what: str, why: str, instead: str) -> None:
    """Raise the one-line refusal of ``what`` under several ranks (a no-op with one process)."""
    if world_size() > 1:
        raise DistributedError(f"{what} does not run data-parallel ({why}); {instead}")


# ---- errors across ranks -------------------------------------------------------------------

def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store() if active() else None
    except (ImportError, RuntimeError, ValueError, AttributeError):
        return None


def _key() -> str:
    return _ERROR_KEY.format(run=_STATE["run"])


def peer_error() -> str | None:
    """The error another rank posted (see :func:`report_error`), if any."""
    store = _store()
    if store is None:
        return None
    for r in range(world_size()):
        if r == rank():
            continue
        try:
            if store.check([f"{_key()}{r}"]):
                line = store.get(f"{_key()}{r}").decode()
                return f"rank {r} failed: {re.sub(r'^structlm [a-z]+: error: ', '', line)}"
        except (RuntimeError, ValueError):
            return None
    return None


def report_error(line: str) -> None:
    """Print ``line`` (a one-line error) once for the whole run.  Rank 0 prints its own; another
    rank stays quiet when rank 0 failed too (a bad option fails every rank alike, and a rank 0
    that stopped for a peer names that peer's error), else prints its own, prefixed with its rank."""
    stream = error_stream()
    store = _store()
    if store is None:
        print(line, file=stream)
        return
    me = rank()
    try:
        store.set(f"{_key()}{me}", line)
    except (RuntimeError, ValueError):
        pass
    if me == 0:
        print(line, file=stream)
        return
    import time

    for _ in range(50):             # up to 5 s (polled: a timed-out store.wait logs a C++ warning)
        try:
            if store.check([f"{_key()}0"]):
                return               # rank 0 has said it
        except (RuntimeError, ValueError):
            break
        time.sleep(0.1)
    print(f"[rank {me}] {line}", file=stream)


def _collective(fn, *args):
    """Run one collective; a peer that died turns into a one-line error naming its own."""
    try:
        return fn(*args)
    except (RuntimeError, ValueError) as e:   # DistBackendError is a RuntimeError
        other = peer_error()
        raise DistributedError(f"data-parallel calibration stopped: {other or 'another rank failed'}"
                               + ("" if other else f" ({str(e).splitlines()[0][:200]})")) from None


# ---- sharding ------------------------------------------------------------------------------

def shard_range(n: int, batch_size: int = 1) -> range:
    """The sample indices of this rank: a contiguous run of whole batches of ``batch_size``
    (the batches a single process cuts ``n`` samples into, spread as evenly as possible).  With
    fewer batches than ranks the samples themselves are spread (each rank's batch is then a part
    of a single process's batch: the same samples, float32 rounding of another batch shape)."""
    size = world_size()
    if size == 1:
        return range(n)
    if n < size:
        raise DistributedError(
            f"data-parallel calibration: {n} calibration sample(s) cannot be shared by {size} ranks; use "
            f"--calib-samples {size} or more (or the method's sample option), or fewer processes (--nproc_per_node)")
    batches = -(-n // max(1, batch_size))
    if batches < size:
        batch_size, batches = 1, n
    r = rank()
    base, extra = divmod(batches, size)
    first = r * base + min(r, extra)
    last = first + base + (1 if r < extra else 0)
    return range(first * batch_size, min(last * batch_size, n))


def shard(calib: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """This rank's share of the calibration samples ``calib`` [N, ...] (see :func:`shard_range`)."""
    if world_size() == 1:
        return calib
    share = shard_range(int(calib.shape[0]), batch_size)
    return calib[share.start:share.stop]


# ---- reductions ----------------------------------------------------------------------------

def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over the ranks, in place (every rank gets rank 0's bit-identical totals).
    Tensors of one dtype travel as one flat buffer."""
    if world_size() == 1 or not tensors:
        return tensors
    import torch.distributed as dist

    device = _comm_device()
    buckets: dict = {}   # (dtype, k) -> tensors: one flat buffer of at most BUCKET elements each (or one tensor)
    for t in tensors:
        k = 0
        while sum(x.numel() for x in buckets.get((t.dtype, k), [])) + t.numel() > BUCKET and buckets.get((t.dtype, k)):
            k += 1
        buckets.setdefault((t.dtype, k), []).append(t)
    for _, group in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        _collective(dist.reduce, flat, 0)
        _collective(dist.broadcast, flat, 0)
        offset = 0
        for t in group:
            n = t.numel()
            t.data.copy_(flat[offset:offset + n].view_as(t).to(t.device))
            offset += n
    return tensors


def reduce_floats(*values: float) -> list[float]:
    """Python numbers summed over the ranks (as float64)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    reduce_tensors([t])
    return t.tolist()


def reduce_sums(sums: dict, count: float) -> tuple[dict, float]:
    """A dict of float sums and their count, summed over the ranks (keys in a fixed order; every
    rank must hold the same keys)."""
    if world_size() == 1:
        return sums, count
    keys = sorted(sums, key=repr)
    *values, total = reduce_floats(*(sums[k] for k in keys), count)
    return dict(zip(keys, values)), total


def reduce_input_stats(stats, names=None) -> None:
    """Sum the per-channel input statistics (:class:`structlm.methods._width.InputStats`: sums,
    squared sums and token counts) of modules ``names`` (default: all recorded) over the ranks."""
    if world_size() == 1:
        return
    names = sorted(stats.sum) if names is None else [n for n in dict.fromkeys(names)]
    if not names:
        return
    missing = [n for n in names if n not in stats.sum]
    if missing:
        raise DistributedError(f"data-parallel calibration: no calibration input reached {missing[0]} on rank "
                               f"{rank()}")
    counts = torch.tensor([float(stats.count[n]) for n in names], dtype=torch.float64)
    reduce_tensors([stats.sum[n] for n in names] + [stats.sumsq[n] for n in names] + [counts])
    for n, c in zip(names, counts.tolist()):
        stats.count[n] = int(round(c))


def reduce_grams(grams: dict) -> dict:
    """Sum Gram-like statistics {name: stat with ``.sum`` (a tensor) and ``.count``} over the ranks."""
    if world_size() == 1:
        return grams
    names = sorted(grams)
    empty = [n for n in names if grams[n].sum is None]
    if empty:
        raise DistributedError(f"data-parallel calibration: no calibration input reached {empty[0]} on rank "
                               f"{rank()}")
    counts = torch.tensor([float(grams[n].count) for n in names], dtype=torch.float64)
    reduce_tensors([grams[n].sum for n in names] + [counts])
    for n, c in zip(names, counts.tolist()):
        grams[n].count = int(round(c))
    return grams


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first, the other ranks after it (for work that fills a cache on
    first use, e.g. converting a built-in model or extracting a text source)."""
    if world_size() > 1 and not is_main():
        barrier()
    yield
    if world_size() > 1 and is_main():
        barrier()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        _collective(dist.barrier)
