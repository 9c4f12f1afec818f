"""Shrink and export on the real SmolLM2-135M: exactness, speed, memory, reload in a fresh process."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from structlm import export, surgery
from structlm.graph import build_graph
from structlm.models import count_parameters
from structlm.pipeline import PeakMemory
from structlm.plan import LayerPlan, PrunePlan
from test_export import BLOCK_STRUCTLM, same_threads

pytestmark = pytest.mark.real


def uniform_plan() -> PrunePlan:  # 2 of 3 KV groups, FFN 1536 -> 1024, in every layer
    return PrunePlan(layers={i: LayerPlan(kv_groups=[0, 2], ffn_channels=list(range(0, 1536, 3)) + list(range(1, 1536, 3))[:512])
                             for i in range(30)})


def heterogeneous_plan() -> PrunePlan:  # per-layer FFN widths, 6 attention sublayers and 2 blocks removed
    rng = random.Random(0)
    layers = {}
    for i in range(30):
        if i in (20, 25):
            continue
        layers[i] = LayerPlan(ffn_channels=sorted(rng.sample(range(1536), rng.choice([512, 768, 1024, 1280]))),
                              attention=i not in (3, 7, 11, 15, 19, 23))
    return PrunePlan(layers=layers, removed_blocks=[20, 25])


@pytest.fixture(scope="module")
def ids(smollm2):
    _, tok = smollm2
    return tok(["The capital of France is", "Pruning a language model means"], return_tensors="pt",
               padding=True).input_ids


@pytest.mark.parametrize("make_plan, kind", [(uniform_plan, "uniform"), (heterogeneous_plan, "heterogeneous")])
def test_shrink_save_and_reload_in_a_fresh_process(smollm2, ids, make_plan, kind, tmp_path):
    model = copy.deepcopy(smollm2[0])
    graph = build_graph(model)
    plan = make_plan()
    # exactness in float64: shrunk and masked agree to the last bit here; in fp32 the different
    # matmul shapes round differently and 30 layers accumulate ~2e-4 on logits of ~25
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        masked64 = surgery.mask(copy.deepcopy(model64), plan, graph)(ids).logits
        shrunk64 = surgery.shrink(model64, plan, graph)(ids).logits
    torch.testing.assert_close(shrunk64, masked64, atol=1e-10, rtol=0)
    del model64
    with torch.no_grad():
        masked = surgery.mask(copy.deepcopy(model), plan, graph)(ids).logits
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    start = time.perf_counter()
    with PeakMemory() as mem:
        surgery.shrink(model, plan, graph)
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"shrinking took {seconds:.2f} s"
    assert mem.peak - mem.start < model_bytes, "shrinking needed more than one extra copy of the model"
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, masked, atol=1e-3, rtol=0)  # fp32 rounding only (see above)
    assert count_parameters(model) == plan.cost(graph)["params"]

    out = tmp_path / kind
    export.save(model, smollm2[1], out, plan=plan)
    assert (out / "report.json").read_text().count(f'"format": "{kind}"') == 1
    torch.save({"ids": ids, "logits": logits}, tmp_path / "reference.pt")
    remote = kind == "heterogeneous"
    script = (BLOCK_STRUCTLM if remote else "") + same_threads() + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load({str(tmp_path / 'reference.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32,
                                                     trust_remote_code={remote}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        with torch.no_grad():
            err = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
        gen = model.generate(tok("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=4,
                             do_sample=False)
        print("max abs error", err, type(model).__name__)
        assert err < 1e-5, err
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max abs error" in proc.stdout

    reloaded = export.load(out)  # structlm's own loader, no remote code
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-5, rtol=0)
