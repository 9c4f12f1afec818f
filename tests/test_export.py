"""Saved checkpoints reload with stock transformers and give the in-memory pruned logits;
saving is atomic."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from plans import random_plan
from structlm import export, surgery
from structlm.graph import build_graph
from structlm.plan import LayerPlan, PrunePlan
from tiny_models import FAMILIES, tiny_inputs, tiny_model

REPO = Path(__file__).resolve().parents[1]

BLOCK_STRUCTLM = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "structlm" or name.startswith("structlm."):
                raise ImportError("structlm is blocked in this process")
    sys.meta_path.insert(0, _Block())
""")


def same_threads() -> str:
    """Child-process preamble: this process's CPU thread count. A CPU matmul's reduction order depends on
    how many threads split it, so 1 and 2 threads differ by up to ~5e-5 on SmolLM2's logits (Intel Xeon,
    measured); a reload check at 1e-5 must compare like with like."""
    return f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"


def uniform_plan(graph) -> PrunePlan:
    layers = {i: LayerPlan(kv_groups=list(range(max(1, graph.n_kv - 1))) if graph.n_kv > 1 else None,
                           ffn_channels=list(range(0, graph.intermediate, 2))) for i in range(graph.n_layers - 1)}
    return PrunePlan(layers=layers, removed_blocks=[graph.n_layers - 1])


def save_pruned(family, plan_fn, out: Path, seed=0):
    model = tiny_model(family, num_hidden_layers=3, seed=seed)
    graph = build_graph(model)
    plan = plan_fn(graph)
    shrunk = surgery.shrink(model, plan, graph)
    export.save(shrunk, None, out, plan=plan, recipe={"method": "test"}, report={"note": "test"})
    ids = tiny_inputs(shrunk.config)
    with torch.no_grad():
        ref = shrunk(ids).logits
    torch.save({"ids": ids, "ref": ref}, out / "reference.pt")
    return shrunk, ids, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_uniform_and_heterogeneous(family, tmp_path):
    from transformers import AutoModelForCausalLM

    # uniform: stock config, plain from_pretrained (GPT-2/OPT derive head_dim from hidden/heads, so
    # fewer heads cannot be stock there: they fall back to the heterogeneous format)
    _, ids, ref = save_pruned(family, uniform_plan, tmp_path / "uniform")
    report = json.loads((tmp_path / "uniform" / "report.json").read_text())
    assert {"plan.json", "recipe.json", "report.json", "config.json"} <= {p.name for p in (tmp_path / "uniform").iterdir()}
    if family in ("gpt2", "opt"):
        assert report["format"] == "heterogeneous"
    else:
        assert report["format"] == "uniform"
        assert not (tmp_path / "uniform" / export.REMOTE_FILE).exists()
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)

    # heterogeneous: per-layer widths and removed sublayers, loaded by structlm without remote code
    _, ids, ref = save_pruned(family, lambda g: random_plan(g, __import__("random").Random(3)), tmp_path / "het")
    loaded = export.load(tmp_path / "het")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)
    out = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape[1] >= ids.shape[1] + 1


def test_llama_shapes_llamaconfig_rejects_are_saved_as_mistral(tmp_path):
    from transformers import AutoModelForCausalLM

    # 7 of 9 heads with hidden 72: LlamaConfig refuses hidden % heads != 0 even with an explicit
    # head_dim; Mistral's config and modeling compute the same thing and accept it
    model = tiny_model("llama", num_attention_heads=9, num_key_value_heads=9)
    graph = build_graph(model)
    plan = PrunePlan(layers={i: LayerPlan(kv_groups=list(range(7))) for i in range(2)})
    shrunk = surgery.shrink(model, plan, graph)
    export.save(shrunk, None, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["num_attention_heads"] == 7 and config["head_dim"] == 8
    ids = tiny_inputs(shrunk.config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, shrunk(ids).logits, atol=1e-5, rtol=0)


def test_remote_code_loads_where_structlm_is_not_importable(tmp_path):
    outs = []
    for family in ("llama", "gemma3", "gpt2", "opt"):
        out = tmp_path / family
        save_pruned(family, lambda g: random_plan(g, __import__("random").Random(7)), out)
        assert (out / export.REMOTE_FILE).exists()
        outs.append(str(out))
    script = BLOCK_STRUCTLM + same_threads() + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        for out in {outs!r}:
            ref = torch.load(out + "/reference.pt")
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                err = (model(ref["ids"]).logits - ref["ref"]).abs().max().item()
            gen = model.generate(ref["ids"][:1], max_new_tokens=3, do_sample=False)
            assert err < 1e-5, (out, err)
            print("ok", out.rsplit("/", 1)[-1], type(model).__name__, err)
        try:
            import structlm
            print("structlm importable")
        except ImportError:
            print("structlm blocked")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 4 and "structlm blocked" in proc.stdout


def test_refuses_to_overwrite_and_force_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = tiny_model("llama")
    with pytest.raises(FileExistsError, match="--force"):
        export.save(model, None, out)
    assert (out / "keep.txt").read_text() == "mine"
    export.save(model, None, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or backup left


@pytest.mark.parametrize("existing", [False, True])
def test_killing_a_save_leaves_the_output_absent_or_untouched(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from tiny_models import tiny_model
        from structlm import export
        model = tiny_model("llama")
        real = model.save_pretrained
        def slow_save(path, **kw):
            real(path, **kw)                      # the weights are half way to disk...
            open({str(marker)!r}, "w").close()
            time.sleep(60)                        # ...when the process is killed
        model.save_pretrained = slow_save
        export.save(model, None, {str(out)!r}, force=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the save never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if existing:
        assert [p.name for p in out.iterdir()] == ["old.txt"]
    else:
        assert not out.exists()


# ---- concurrent writers, leftovers, modes, the model card --------------------------------------------

def test_a_second_writer_of_the_same_output_is_refused_at_once(tmp_path):
    from structlm.outputs import OutputError, OutputFolder

    out = tmp_path / "out"
    with OutputFolder(out) as first:
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with OutputFolder(out, force=True):
                pass
        assert first.staging.is_dir()  # the refused writer took nothing away from the first
        (first.staging / "x.txt").write_text("first")
        first.commit()
    assert (out / "x.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_path_that_appears_while_working_is_replaced_only_with_force(tmp_path):
    from structlm.outputs import OutputFolder

    out = tmp_path / "out"
    with OutputFolder(out) as output:
        (output.staging / "mine.txt").write_text("ours")
        out.mkdir()
        (out / "theirs.txt").write_text("another program's")  # after our initial check
        with pytest.raises(FileExistsError, match="appeared while structlm was working"):
            output.commit()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our staging and lock are gone
    with OutputFolder(out, force=True) as output:
        (output.staging / "mine.txt").write_text("ours")
        (out / "late.txt").write_text("also theirs")
        output.commit()
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_staging_folders_of_dead_processes_are_swept_at_the_next_save(tmp_path):
    from helpers import dead_pid

    dead, alive = dead_pid(), os.getppid()
    left = [tmp_path / f".out.partial-{dead}-0a1b2c3d", tmp_path / f".out.old-{dead}-0a1b2c3d",
            tmp_path / f".other.partial-{dead}-0a1b2c3d"]  # an abandoned output of another name too
    live = tmp_path / f".out.partial-{alive}-0a1b2c3d"  # another process still writing: not ours to touch
    for folder in left + [live]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.lock").write_text(f"{dead}\n")  # a killed writer's lock: the kernel dropped it
    export.save(tiny_model("llama"), None, tmp_path / "out")
    assert not any(p.exists() for p in left) and live.is_dir()
    assert not (tmp_path / ".other.lock").exists()
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_modes_follow_the_umask(tmp_path, umask, folder_mode, file_mode):
    import stat

    old = os.umask(umask)
    try:
        export.save(tiny_model("llama"), None, tmp_path / "out")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {file_mode}


def test_a_full_disk_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from structlm.outputs import OutputError

    model = tiny_model("llama")

    def full(path, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"par")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(OutputError, match="the disk is full"):
        export.save(model, None, tmp_path / "new" / "out")
    assert list(tmp_path.iterdir()) == []


def test_model_card_of_a_heterogeneous_checkpoint(tmp_path):
    import random

    save_pruned("llama", lambda g: random_plan(g, random.Random(3)), tmp_path / "het")
    card = (tmp_path / "het" / "README.md").read_text()
    assert card.startswith("---\n") and 'pipeline_tag: "text-generation"' in card
    assert 'from_pretrained("het", trust_remote_code=True)' in card and "structlm.load" in card
    assert export.REMOTE_FILE in card


def head_dim_plan(graph, seed=5) -> PrunePlan:
    """Per-layer q/k and v head dims (different per layer, kept dims different per KV group),
    with a removed KV group, a removed query head and FFN channels; q/k dims only where exact."""
    import random

    rng = random.Random(seed)
    per_group = graph.n_heads // graph.n_kv
    layers = {}
    for i in range(graph.n_layers):
        groups = list(range(graph.n_kv))[: max(1, graph.n_kv - (i == 0))]
        heads = None
        if per_group > 1 and i == 1:
            heads = [g * per_group + j for g in groups for j in range(per_group - 1)]
        lp = LayerPlan(kv_groups=groups if len(groups) < graph.n_kv else None, query_heads=heads,
                       ffn_channels=sorted(rng.sample(range(graph.intermediate), graph.intermediate // 2)))
        v_size = graph.channel_group("v_channel", i, 0).count
        lp.v_channels = {g: sorted(rng.sample(range(v_size), max(1, v_size - 1 - i))) for g in groups}
        if graph.groups_of("qk_channel", i):
            qk_size = graph.channel_group("qk_channel", i, 0).count
            lp.qk_channels = {g: sorted(rng.sample(range(qk_size), max(1, qk_size - 1 - (i % 2)))) for g in groups}
        layers[i] = lp
    return PrunePlan(layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_head_dims_round_trip(family, tmp_path):
    """Pruned q/k and v head dims: a heterogeneous checkpoint whose reload (structlm.load) gives the
    in-memory logits, which are the masked model's (kept rotary pairs keep their frequencies, the
    attention scale stays 1/sqrt(original head_dim))."""
    from structlm.graph import GraphBuildError

    model = tiny_model(family, num_hidden_layers=3)
    graph = build_graph(model)
    plan = head_dim_plan(graph)
    masked = surgery.mask(copy.deepcopy(model), plan, graph)
    shrunk, ids, ref = save_pruned(family, head_dim_plan, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(masked(ids).logits, ref, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    layout = config["structlm"]
    assert json.loads((tmp_path / "m" / "report.json").read_text())["format"] == "heterogeneous"
    dims = [(r["qk_head_dim"], r["v_head_dim"]) for r in layout["layers"]]
    assert len(set(dims)) > 1 and all(v < graph.head_dim for _, v in dims)
    assert layout["channel_maps"] and all(set(m) in ({"out_index", "out_size"}, {"in_index", "in_size"})
                                          for m in layout["channel_maps"].values())
    loaded = export.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-5, rtol=0)
    assert loaded.generate(ids[:1], max_new_tokens=3, do_sample=False).shape[1] >= ids.shape[1] + 1
    assert sum(p.numel() for p in loaded.parameters()) == plan.cost(graph)["params"]
    with pytest.raises(GraphBuildError, match="head dims were pruned"):
        build_graph(loaded)


def test_head_dim_checkpoints_load_with_remote_code_without_structlm(tmp_path):
    outs = []
    for family in ("llama", "qwen3", "phi3", "gpt2"):
        save_pruned(family, head_dim_plan, tmp_path / family)
        outs.append(str(tmp_path / family))
    script = BLOCK_STRUCTLM + same_threads() + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        for out in {outs!r}:
            ref = torch.load(out + "/reference.pt")
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                err = (model(ref["ids"]).logits - ref["ref"]).abs().max().item()
            model.generate(ref["ids"][:1], max_new_tokens=3, do_sample=False)
            assert err < 1e-5, (out, err)
            print("ok", out.rsplit("/", 1)[-1], err)
        try:
            import structlm
            print("structlm importable")
        except ImportError:
            print("structlm blocked")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 4 and "structlm blocked" in proc.stdout
