"""The Torch-Pruning anchor runs its LLM recipe on a tiny Llama (the benchmarks rely on it)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from structlm.anchors import tp_prune, tp_prune_to_params
from structlm.models import count_parameters
from tiny_models import tiny_inputs, tiny_model


@pytest.mark.parametrize("importance, prune_hidden", [("l2", True), ("taylor", False)])
def test_tp_recipe_prunes_heads_ffn_and_optionally_hidden(importance, prune_hidden):
    dense = tiny_model("llama")
    x = tiny_inputs(dense.config, batch=2, seq=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tp_prune(copy.deepcopy(dense), 0.3, importance=importance, calib=x, prune_hidden=prune_hidden)
    c = model.config
    assert c.num_attention_heads < 9 and c.num_key_value_heads == 3  # TP prunes query heads within groups
    assert c.intermediate_size < 192
    assert (c.hidden_size < 72) == prune_hidden
    assert c._attn_implementation == dense.config._attn_implementation   # traced eager, runs as the dense one
    with torch.no_grad():
        assert model(x).logits.shape == (2, 12, 128)
    assert count_parameters(model) < count_parameters(dense)


def test_ratio_search_meets_the_parameter_target():
    dense = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, ratio, kept = tp_prune_to_params(lambda: copy.deepcopy(dense), 0.8, prune_hidden=False,
                                                tolerance=0.03)
    assert abs(kept - 0.8) <= 0.03 and 0 < ratio < 0.9
