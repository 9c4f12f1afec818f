"""The real SmolLM2-135M-Instruct, fetched from PyPI and cached."""

from __future__ import annotations

import time

import pytest
import torch

from structlm import evaluate, models

pytestmark = pytest.mark.real


def test_shape_and_parameter_count(smollm2):
    model, _ = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (30, 576, 9, 3, 1536)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert models.count_parameters(model) == 134_515_008


def test_greedy_completion(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_second_load_comes_from_the_cache(smollm2):
    start = time.perf_counter()
    model, _ = models.load_model("smollm2-135m")
    assert time.perf_counter() - start < 10
    torch.testing.assert_close(model.model.embed_tokens.weight, smollm2[0].model.embed_tokens.weight)


def test_heldout_perplexity_is_plausible(smollm2):
    torch.set_num_threads(2)
    model, tok = smollm2
    result = evaluate.perplexity(model, tok, seq_len=2048, max_tokens=4096, progress=False)
    assert result["windows"] == 2 and result["tokens_scored"] == 2 * 2047
    assert 10 < result["ppl"] < 30  # 18.9 on 32k tokens; these first 4k tokens score ~15.9
