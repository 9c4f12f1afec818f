"""Perplexity, latency and size of a causal LM."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data
from .models import NonFiniteError, count_parameters, dtype_name


@torch.no_grad()
def perplexity(model, tokenizer, seq_len: int = 2048, max_tokens: int | None = None,
               source: str = data.BUILTIN, batch_size: int = 1, progress: bool = True) -> dict:
    """Held-out perplexity, SparseGPT/SliceGPT protocol: the held-out text joined, tokenized once,
    cut into non-overlapping windows of ``seq_len``; every window predicts its own tokens from
    position 1 on, and ppl = exp(total NLL / tokens scored).  A non-finite loss raises
    :class:`~structlm.models.NonFiniteError` instead of returning a NaN perplexity."""
    windows = data.heldout_windows(tokenizer, seq_len=seq_len, max_tokens=max_tokens, source=source)
    device = next(model.parameters()).device
    total_nll, scored = 0.0, 0
    bar = tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress)
    for start in bar:
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        if not torch.isfinite(nll):  # one NaN/Inf logit makes the whole perplexity meaningless: stop here
            raise NonFiniteError(
                f"perplexity is not finite: windows {start}-{start + batch.shape[0] - 1} of {windows.shape[0]} "
                f"give a loss of {nll.item()} (the model's logits contain NaN or Inf: damaged weights, or an "
                f"overflow in {dtype_name(model)}); a pruned model that does this is broken, not just worse")
        total_nll += nll.item()
        scored += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(total_nll / scored):.2f}")
    return {"ppl": math.exp(total_nll / scored), "window": seq_len, "windows": int(windows.shape[0]),
            "tokens_scored": scored, "source": source}


def _timer(device: torch.device):
    """A function that times one call of ``fn`` in milliseconds (CUDA events on GPU)."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return timed


@torch.no_grad()
def latency(model, batch_size: int = 1, seq_len: int = 128, decode_tokens: int = 32, warmup: int = 2,
            repeats: int = 5, progress: bool = True) -> dict:
    """Prefill time of a [batch, seq] forward and per-token decode time with a KV cache
    (median of ``repeats`` after ``warmup`` runs)."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    step_ids = torch.randint(0, vocab, (batch_size, decode_tokens), generator=generator).to(device)
    timed = _timer(device)

    def prefill():
        model(input_ids=prompt, use_cache=False)

    def decode():
        """Median time of one cached decoding step after prefilling the prompt."""
        state = {"cache": model(input_ids=prompt, use_cache=True).cache}
        times = []
        for i in range(decode_tokens):
            def step(i=i):
                state["cache"] = model(input_ids=step_ids[:, i:i + 1], cache=state["cache"],
                                       use_cache=True).cache
            times.append(timed(step))
        return statistics.median(times)

    bar = tqdm(total=2 * (warmup + repeats), desc="latency", disable=not progress)
    prefill_ms, decode_ms = [], []
    for i in range(warmup + repeats):
        t = timed(prefill)
        bar.update()
        d = decode()
        bar.update()
        if i >= warmup:
            prefill_ms.append(t)
            decode_ms.append(d)
    bar.close()
    return {"prefill_ms": statistics.median(prefill_ms), "decode_ms_per_token": statistics.median(decode_ms),
            "batch": batch_size, "seq_len": seq_len, "decode_tokens": decode_tokens, "repeats": repeats,
            "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "timer": "cuda events" if device.type == "cuda" else "perf_counter"}


def size_on_disk(path) -> int | None:
    """Bytes of weight files in a model folder (None when the model was not loaded from a folder)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))


def model_size(model, folder=None) -> dict:
    return {"params": count_parameters(model), "bytes_on_disk": size_on_disk(folder),
            "dtype": dtype_name(model)}
