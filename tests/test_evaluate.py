"""Perplexity protocol and latency measurement on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from structlm import data, evaluate
from structlm.models import NonFiniteError
from helpers import SAMPLE_TEXT, tiny_llama, tiny_tokenizer


def test_perplexity_matches_a_hand_computation(tmp_path):
    path = tmp_path / "held.txt"
    path.write_text(SAMPLE_TEXT * 2)
    tok, model = tiny_tokenizer(), tiny_llama()
    result = evaluate.perplexity(model, tok, seq_len=40, source=str(path), progress=False, batch_size=3)
    ids = data.tokenize_documents(tok, [path.read_text()])
    n = ids.numel() // 40
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):  # each window on its own, scored from its second token on
            window = ids[w * 40:(w + 1) * 40]
            logits = model(window[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += 39
    assert result["windows"] == n and result["tokens_scored"] == count and result["window"] == 40
    assert math.isclose(result["ppl"], math.exp(nll / count), rel_tol=1e-5)


def test_latency_reports_medians():
    model = tiny_llama()
    lat = evaluate.latency(model, batch_size=2, seq_len=16, decode_tokens=4, warmup=1, repeats=3, progress=False)
    assert lat["prefill_ms"] > 0 and lat["decode_ms_per_token"] > 0
    assert (lat["batch"], lat["seq_len"], lat["timer"]) == (2, 16, "perf_counter")


def test_model_size_counts_disk_bytes(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    size = evaluate.model_size(model, tmp_path)
    assert size["bytes_on_disk"] == (tmp_path / "model.safetensors").stat().st_size
    assert size["dtype"] == "float32"


def test_a_non_finite_loss_fails_loudly_instead_of_a_nan_perplexity(tmp_path):
    path = tmp_path / "held.txt"
    path.write_text(SAMPLE_TEXT * 2)
    tok, model = tiny_tokenizer(), tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit is NaN from then on
    with pytest.raises(NonFiniteError, match="perplexity is not finite: windows 0-2 of"):
        evaluate.perplexity(model, tok, seq_len=40, source=str(path), progress=False, batch_size=3)
