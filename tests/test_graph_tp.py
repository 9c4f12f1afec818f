"""Cross-check of structlm's coupled units against Torch-Pruning's DependencyGraph.

For the tiny model of every family, Torch-Pruning (TP) traces the model and we ask it for the
group of parameter slices coupled to (a) one FFN channel, (b) one KV head's key rows and (c) one
query head's rows; the parameter slices (param, dim, indices) must equal structlm's units:

  (a) TP(ffn channel c)       == structlm ffn_channel c
  (b) TP(k rows of KV head g) == structlm kv_group g
  (c) TP(q rows of head h)    == structlm query_head h + the k/v rows of its KV group
      (TP's raw graph couples a query head with the key/value head it reads -- the contracted
      dim of Q K^T; structlm's query_head leaves k/v with the group, whose other heads still
      use them: removing the query head alone is valid, as the masking tests prove).

TP runs in a subprocess with a timeout so that a TP hang (issue #527) cannot hang the suite.
Harness patches (known TP 1.6.1 traps with torch 2.13 / transformers 5.24):
  * autograd reports torch.cat/split dims as unsigned (2**64-1 for dim=-1); TP compares them
    with small ints and loops forever on RoPE's cat(dim=-1): a dim >= 2**63 is read as negative.
  * models are traced with eager attention (SDPA passes enable_gqa=True and skips repeat_kv,
    so TP cannot map GQA heads, issue #516).
  * GPT-2's Conv1D is unknown to TP: a customized pruner (a transposed Linear) is registered.
Where TP cannot trace a family correctly the test records why (KNOWN_TP_LIMITS) and asserts
that limitation still holds, so a fixed TP shows up as an unexpected pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = int(os.environ.get("STRUCTLM_TP_TIMEOUT", "120"))

# family -> {unit kind: reason}.  For a listed kind TP's slices must be a strict subset of
# structlm's (TP misses coupled slices, it adds none); every other check must match exactly.
KNOWN_TP_LIMITS: dict[str, dict[str, str]] = {
    "phi3": {"ffn_channel": "gate_up_proj output is split with chunk(2, dim=-1) on a 3-D activation; TP only "
                            "index-maps splits along dim 1, so the `up` half (rows intermediate + c) is missed"},
    "gpt2": {"kv_group": "fused c_attn is split with .split(n_embd, dim=2); TP does not map that split and "
                         "misses the key columns (n_embd + h*head_dim ...) of c_attn and of its bias",
             "query_head": "same: the key columns of the fused c_attn are missed"},
}


# ------------------------------------------------------------------------ harness ----
def _patch_tp():
    from structlm.anchors import patch_torch_pruning

    patch_torch_pruning()


def _conv1d_pruner():
    import torch
    import torch_pruning as tp

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        """transformers' Conv1D: weight [in, out] (a transposed Linear)."""

        def prune_out_channels(self, layer, idxs):
            keep = [i for i in range(layer.nf) if i not in set(idxs)]
            layer.weight = torch.nn.Parameter(layer.weight.data[:, keep])
            layer.bias = torch.nn.Parameter(layer.bias.data[keep])
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = [i for i in range(layer.weight.shape[0]) if i not in set(idxs)]
            layer.weight = torch.nn.Parameter(layer.weight.data[keep])
            return layer

        def get_out_channels(self, layer):
            return layer.nf

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return Conv1DPruner()


def _tp_slices(dg, group, model) -> dict[str, list[int]]:
    """TP group -> {"param|dim": sorted indices} over parameter-holding targets."""
    import torch
    from transformers.pytorch_utils import Conv1D

    mod_names = {m: n for n, m in model.named_modules()}
    param_names = {p: n for n, p in model.named_parameters()}
    out: dict[str, set[int]] = {}

    def add(param, dim, idxs):
        out.setdefault(f"{param}|{dim}", set()).update(int(i) for i in idxs)

    for item in group:
        dep, idxs = item.dep, item.idxs
        mod = dep.target.module
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        if isinstance(mod, torch.nn.Parameter):
            name = param_names.get(mod) or dg._param_to_name.get(mod)
            add(name, dep.target.pruning_dim if dep.target.pruning_dim >= 0 else mod.ndim - 1, idxs)
            continue
        name = mod_names.get(mod)
        if name is None or not any(True for _ in mod.parameters(recurse=False)):
            continue
        if isinstance(mod, Conv1D):
            if is_out:
                add(f"{name}.weight", 1, idxs)
                add(f"{name}.bias", 0, idxs)
            else:
                add(f"{name}.weight", 0, idxs)
        elif isinstance(mod, torch.nn.Linear):
            if is_out:
                add(f"{name}.weight", 0, idxs)
                if mod.bias is not None:
                    add(f"{name}.bias", 0, idxs)
            else:
                add(f"{name}.weight", 1, idxs)
        elif isinstance(mod, torch.nn.Embedding):
            add(f"{name}.weight", 1, idxs)
        else:  # norms (LayerNorm, RMSNorm): 1-D parameters
            for pn, p in mod.named_parameters(recurse=False):
                add(f"{name}.{pn}", 0, idxs)
    return {k: sorted(v) for k, v in out.items()}


def _ours(unit_slices) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for param, dim, a, b in unit_slices:
        out.setdefault(f"{param}|{dim}", set()).update(range(a, b))
    return {k: sorted(v) for k, v in out.items()}


def run_family(family: str) -> dict:
    """Trace ``family``'s tiny model with TP; return {check: {"tp": slices, "ours": slices}}."""
    import logging

    import torch
    import torch_pruning as tp
    from transformers.pytorch_utils import Conv1D

    sys.path.insert(0, str(HERE))
    from tiny_models import tiny_inputs, tiny_model

    from structlm.families import get_adapter
    from structlm.graph import build_graph

    logging.getLogger("transformers").setLevel(logging.ERROR)
    _patch_tp()
    model = tiny_model(family)
    graph = build_graph(model)
    ad = get_adapter(model.config).bind({n: tuple(p.shape) for n, p in model.named_parameters()})
    x = tiny_inputs(model.config, batch=1, seq=6)
    conv1d = _conv1d_pruner()
    dg = tp.DependencyGraph().build_dependency(
        model, example_inputs={"input_ids": x}, forward_fn=lambda m, inp: m(**inp, use_cache=False).logits,
        customized_pruners={Conv1D: conv1d}, verbose=False)
    modules = dict(model.named_modules())
    layer = graph.n_layers - 1
    H, KV, hd, I = graph.n_heads, graph.n_kv, graph.head_dim, graph.intermediate
    rep = H // KV

    def root(proj, first, count):
        mod = modules[proj.weight.rsplit(".", 1)[0]]
        fn = tp.prune_linear_out_channels if isinstance(mod, torch.nn.Linear) else conv1d.prune_out_channels
        return dg.get_pruning_group(mod, fn, idxs=list(range(proj.offset + first, proj.offset + first + count)))

    results = {}
    for c in (0, I - 1):
        g = root(ad.ffn_in(layer)[0], c, 1)
        results[f"ffn_channel {c}"] = {"tp": _tp_slices(dg, g, model),
                                       "ours": _ours(graph.group("ffn_channel", layer).unit(c).slices)}
    qk_norms = set(ad.qk_norms(layer))
    tp_dropped = {}

    def tp_of(g):
        """TP's slices, less q_norm/k_norm: TP treats these per-head_dim norms (shape [head_dim],
        shared by all heads) as if they were [heads*head_dim] channel norms and reports indices past
        their size; structlm keeps them with the attention sublayer."""
        sl = _tp_slices(dg, g, model)
        for k in [k for k in sl if k.split("|")[0] in qk_norms]:
            tp_dropped[k] = max(sl.pop(k))
        return sl

    for kvh in sorted({0, KV - 1}):
        # TP rooted at a KV head's k rows stops at Q K^T (it never reaches q, v, o), so the KV
        # group is compared with the union of TP's groups of the group's query heads
        union: dict[str, set] = {}
        for h in range(kvh * rep, (kvh + 1) * rep):
            for k, v in tp_of(root(ad.q(layer), h * hd, hd)).items():
                union.setdefault(k, set()).update(v)
        results[f"kv_group {kvh}"] = {"tp": {k: sorted(v) for k, v in union.items()},
                                      "ours": _ours(graph.group("kv_group", layer).unit(kvh).slices),
                                      "tp_from_k_rows": tp_of(root(ad.k(layer), kvh * hd, hd))}
    for h in sorted({0, H - 1}):
        g = root(ad.q(layer), h * hd, hd)
        kv_unit = graph.group("kv_group", layer).unit(h // rep)
        kv_only = [s for s in kv_unit.slices if s[0] in (ad.k(layer).weight, ad.k(layer).bias, ad.v(layer).weight,
                                                         ad.v(layer).bias)]
        if ad.k(layer).weight == ad.q(layer).weight:  # fused qkv: k/v are the slices past the q block
            kv_only = [s for s in kv_unit.slices if s[0] == ad.q(layer).weight or s[0] == ad.q(layer).bias]
            kv_only = [s for s in kv_only if s[2] >= ad.k(layer).offset]
        results[f"query_head {h}"] = {"tp": tp_of(g),
                                      "ours": _ours(graph.group("query_head", layer).unit(h).slices + kv_only)}
    results["_qk_norm_indices_reported_by_tp"] = {"max_index": tp_dropped, "size": hd}
    return results


def _diff(tp_s, ours) -> str:
    lines = []
    for k in sorted(set(tp_s) | set(ours)):
        a, b = set(tp_s.get(k, [])), set(ours.get(k, []))
        if a != b:
            lines.append(f"  {k}: only TP {sorted(a - b)[:12]}{'...' if len(a - b) > 12 else ''}; "
                         f"only structlm {sorted(b - a)[:12]}{'...' if len(b - a) > 12 else ''}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- tests ----
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt2", "opt")


@pytest.mark.parametrize("family", FAMILIES)
def test_tp_crosscheck(family):
    pytest.importorskip("torch_pruning")
    cmd = [sys.executable, str(Path(__file__)), family]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Torch-Pruning did not finish tracing {family} in {TIMEOUT_S} s (graph search loop?)")
    assert proc.returncode == 0, f"TP harness failed for {family}:\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    limits = KNOWN_TP_LIMITS.get(family, {})
    problems = []
    qk = results.pop("_qk_norm_indices_reported_by_tp")
    if family in ("qwen3", "gemma3"):  # the TP q/k-norm limitation documented in run_family
        assert qk["max_index"] and max(qk["max_index"].values()) >= qk["size"], qk
    for check, r in results.items():
        same = r["tp"] == r["ours"]
        kind = check.split()[0]
        if kind in limits:
            if same:
                problems.append(f"{check}: matches now, although listed as a TP limit ({limits[kind]})")
            elif not all(set(v) <= set(r["ours"].get(k, [])) for k, v in r["tp"].items()):
                problems.append(f"{check}: TP found slices structlm does not have\n{_diff(r['tp'], r['ours'])}")
        elif not same:
            problems.append(f"{check}: TP and structlm differ\n{_diff(r['tp'], r['ours'])}")
    assert not problems, f"{family}:\n" + "\n".join(problems)


if __name__ == "__main__":
    print(json.dumps(run_family(sys.argv[1])))
