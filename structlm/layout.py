"""Per-layer shapes that a stock config cannot express, applied to a stock model.

A *layout* is plain JSON saved as ``config.structlm`` in heterogeneous checkpoints:

* ``param_shapes``: parameter name -> shape, for every parameter whose shape differs from what
  the stock class builds from the config;
* ``module_attrs``: module name -> {attribute: value} (e.g. ``num_key_value_groups`` of an
  attention module with fewer heads); the key ``config`` holds fields of a per-module config copy;
* ``placeholders``: module name -> ``"attention"`` | ``"zero"`` | ``"identity"`` for removed
  sublayers: an attention that contributes nothing, a module whose output is zeros, a norm
  that is no longer needed;
* ``channel_maps``: module name -> ``{"out_index": [...], "out_size": n}`` for a q/k/v projection
  (or fused qkv tensor) that lost head dims (MoDeGPT's q/k rotary pairs, v dims): its narrow
  output is scattered into ``out_size`` positions (zeros elsewhere), the width the stock
  attention views as heads x head_dim, so the kept rotary pairs keep their frequencies and the
  attention scale stays 1/sqrt(original head_dim); ``{"in_index": [...], "in_size": n}`` for the
  output projection, which reads only its kept input columns.

This file is self-contained (torch and transformers only): its source is copied into every
heterogeneous checkpoint as the remote code, so such checkpoints load with
``trust_remote_code=True`` where structlm is not installed.
"""

import copy

import torch
from torch import nn


class RemovedAttention(nn.Module):
    """An attention sublayer that was pruned away: it adds nothing to the residual stream.

    It still advances its KV cache layer by one-channel zero keys/values (batch x 1 x seq x 1):
    transformers reads the sequence length seen so far from layer 0's cache, and a cache layer
    with no elements reports length 0 and is skipped by ``batch_select_indices`` (beam search,
    shared-prefix scoring), which would break those for a model whose layer-0 attention is gone."""

    def __init__(self, layer_idx=None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            batch, seq = hidden_states.shape[0], hidden_states.shape[-2]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class Zero(nn.Module):
    """A pruned-away FFN (or its output projection): outputs zeros shaped like its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


PLACEHOLDERS = {"attention": RemovedAttention, "zero": Zero, "identity": nn.Identity}


class _Index:
    """Kept positions as a plain list, turned into a tensor on the device that needs it (layouts are
    applied while ``from_pretrained`` builds the model on the ``meta`` device)."""

    def __init__(self, index, size):
        self.positions = [int(i) for i in index]
        self.size = int(size)
        self._tensors = {}

    def on(self, device):
        t = self._tensors.get(device)
        if t is None:
            t = self._tensors[device] = torch.tensor(self.positions, dtype=torch.long, device=device)
        return t


class ScatterOutput(_Index):
    """Forward hook: put a narrow projection's outputs at ``index`` of a zero tensor ``size`` wide."""

    def __call__(self, module, args, output):
        full = output.new_zeros(*output.shape[:-1], self.size)
        return full.index_copy_(-1, self.on(output.device), output)


class GatherInput(_Index):
    """Forward pre-hook: keep only the input columns at ``index`` (the projection's kept inputs)."""

    def __call__(self, module, args):
        x = args[0]
        return (x.index_select(-1, self.on(x.device)),) + tuple(args[1:])


def _set_channel_map(module, spec):
    for handle in getattr(module, "_structlm_channel_hooks", ()):
        handle.remove()
    if "out_index" in spec:
        handles = [module.register_forward_hook(ScatterOutput(spec["out_index"], spec["out_size"]))]
    else:
        handles = [module.register_forward_pre_hook(GatherInput(spec["in_index"], spec["in_size"]))]
    module._structlm_channel_hooks = handles


def _set_module(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _resize_param(model, name, shape):
    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, pname)
    if tuple(old.shape) == tuple(shape):
        return
    module._parameters[pname] = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                             requires_grad=old.requires_grad)
    sync_module_sizes(module)


def sync_module_sizes(module):
    """Make size attributes of a Linear / Conv1D / Embedding / LayerNorm agree with its weight."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(weight.shape)
    elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight [in, out]
        module.nx, module.nf = weight.shape


def apply_layout(model, layout):
    """Reshape a stock model in place to ``layout`` (placeholders, parameter shapes, attributes)."""
    if not layout:
        return model
    for name, kind in layout.get("placeholders", {}).items():
        old = model.get_submodule(name)
        if kind == "attention":
            _set_module(model, name, RemovedAttention(getattr(old, "layer_idx", None)))
        else:
            _set_module(model, name, PLACEHOLDERS[kind]())
    for name, shape in layout.get("param_shapes", {}).items():
        _resize_param(model, name, shape)
    for name, attrs in layout.get("module_attrs", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            if attr == "config":
                module.config = copy.copy(module.config)
                for key, val in value.items():
                    setattr(module.config, key, val)
            else:
                setattr(module, attr, value)
    for name, spec in layout.get("channel_maps", {}).items():
        _set_channel_map(model.get_submodule(name), spec)
    return model
