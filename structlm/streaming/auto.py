"""Automatic streaming: whether a checkpoint's weights fit the memory that pruning it in memory
needs, read from its safetensors headers (no weights) and this machine's available memory.

In memory, ``structlm prune`` loads the model in float32 (scores are float32), so it needs about
``4 bytes x parameters`` plus what the method and the calibration activations add on top; the
model is taken not to fit when ``MARGIN x float32 weights + HEADROOM`` exceeds the available
memory (psutil's ``available``, i.e. /proc/meminfo MemAvailable; on a GPU device also the
device's free memory).  ``structlm prune`` then streams a streamable method by itself and refuses
the others in one line (docs/scale.md, "Automatic streaming")."""

from __future__ import annotations

import math
from pathlib import Path

MARGIN = 1.25          # the method's copies and statistics on top of the float32 weights
HEADROOM = 1 << 30     # calibration activations, the interpreter, the libraries


def available_memory(device: str = "cpu") -> int:
    """Bytes this process can still use: the host's available memory, and on a CUDA device the
    smaller of that and the device's free memory (the in-memory model lives there)."""
    import psutil

    free = int(psutil.virtual_memory().available)
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free = min(free, int(torch.cuda.mem_get_info(torch.device(device))[0]))
    return free


def float32_weight_bytes(folder) -> int:
    """The bytes of the checkpoint's floating-point tensors once loaded in float32 (other tensors
    at their size), from the safetensors headers of its files."""
    from .checkpoint import checkpoint_files
    from .run import _st_header

    folder = Path(folder)
    total = 0
    for file in sorted(set(checkpoint_files(folder).values())):
        header, _ = _st_header(folder / file)
        for h in header.values():
            n = math.prod(h["shape"])
            floating = h["dtype"] in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
            total += 4 * n if floating else h["data_offsets"][1] - h["data_offsets"][0]
    return total


def memory_estimate(folder, device: str = "cpu") -> dict:
    """What pruning ``folder`` in memory needs against what is available, in bytes."""
    weights = float32_weight_bytes(folder)
    needed = int(weights * MARGIN) + HEADROOM
    available = available_memory(device)
    return {"float32_weights_bytes": weights, "needed_bytes": needed, "available_bytes": available,
            "fits": needed <= available, "margin": MARGIN, "headroom_bytes": HEADROOM}


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
