"""Plan loading refuses values of the wrong type with a PlanError naming the key; a plan's family
is checked against the model; non-finite scores stop a method before it decides."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import structlm
from structlm.graph import build_graph
from structlm.methods import get
from structlm.plan import PlanError, PrunePlan
from tiny_models import tiny_model


@pytest.mark.parametrize("plan, key", [
    ([1, 2], "JSON object"),
    ({"layers": [1]}, "layers must be an object"),
    ({"layers": {"0": 5}}, "layer 0"),
    ({"layers": {"x": {}}}, "layer number"),
    ({"layers": {"0": {"attention": "no"}}}, "attention: must be true or false"),
    ({"layers": {"0": {"ffn": 0}}}, "ffn: must be true or false"),
    ({"layers": {"0": {"ffn_channels": ["1"]}}}, "ffn_channels: indices must be integers"),
    ({"layers": {"0": {"kv_groups": [True]}}}, "kv_groups: indices must be integers"),
    ({"layers": {"0": {"query_heads": 3}}}, "query_heads: must be a list"),
    ({"removed_blocks": ["3"]}, "removed_blocks: indices must be integers"),
    ({"removed_blocks": [1.5]}, "removed_blocks: indices must be integers"),
    ({"hidden_channels": "all"}, "hidden_channels: must be a list"),
    ({"align": "eight"}, "align must be a whole number"),
    ({"align": 0}, "align must be a whole number"),
    ({"meta": [1]}, "meta must be an object"),
    ({"family": 3}, "family must be a family name"),
    ({"biases": {"model.layers.0.mlp.down_proj.bias": [float("nan")]}}, "NaN"),
    ({"biases": {"model.layers.0.mlp.down_proj.bias": ["a"]}}, "list of numbers"),
])
def test_plan_values_are_type_checked(plan, key, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=key):
        PrunePlan.load(path)


def test_a_plan_for_another_family_is_refused_and_an_empty_family_is_filled():
    model = tiny_model("llama")
    with pytest.raises(PlanError, match="family 'gpt2'"):
        structlm.prune(copy.deepcopy(model), plan=PrunePlan.from_dict({"family": "gpt2", "removed_blocks": [0]}))
    result = structlm.prune(copy.deepcopy(model), plan=PrunePlan.from_dict({"removed_blocks": [0]}))
    assert result.plan.family == "llama"


@pytest.mark.parametrize("method", ["flap", "shortgpt", "ziplm", "modegpt"])
def test_non_finite_weights_stop_a_method_before_it_decides(method):
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    calib = torch.randint(0, model.config.vocab_size, (4, 16))
    target = "blocks=1" if method == "shortgpt" else "params=0.8"
    with pytest.raises(ValueError, match="not finite"):
        get(method)(model, build_graph(model), target, calib, **({"progress": False} if method in ("ziplm", "modegpt") else {}))
