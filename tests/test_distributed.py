"""Data-parallel calibration (structlm.distributed): ``torchrun --standalone --nproc_per_node 2`` (gloo,
CPU) on ``structlm prune`` gives the single-process plan and the same logits of the saved checkpoint,
for every method (and with ``--stream``); only rank 0 prints and writes; an error is one line, once.

Two launches keep it short (torchrun's start-up costs seconds): one ``-m structlm.cli`` run as a
user types it, and one run of tests/distributed_driver.py that runs the other commands one after
the other in the same process group.  The single-process references run in this process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import structlm
from helpers import SAMPLE_TEXT, tiny_tokenizer
from structlm import cli
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
# 16 samples: the batches of 4 (wanda_sp, flap) and 8 (the others) split evenly over 2 ranks
CALIB = ["--calib-samples", "16", "--calib-len", "32", "--no-eval", "--threads", "1"]
# method, target, options, whether it also runs with --stream
RUNS = [("wanda_sp", "params=0.8", [], True), ("ziplm", "params=0.8", [], False),
        ("modegpt", "params=0.8", [], False), ("llm_pruner", "params=0.8", [], False),
        ("shortgpt", "blocks=1", [], True), ("shortgpt_angular", "sublayers=2", [], False),
        ("sleb", "blocks=1", [], False), ("finercut", "sublayers=2", ["-O", "dtype=model"], False),
        ("magnitude", "params=0.8", [], False)]
DIRECT = ("flap", "params=0.8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    folder = root / "llama"     # SmolLM2-135M's structure (GQA 9/3 heads, tied), tiny sizes, 4 layers
    tiny_model("llama", num_hidden_layers=4, vocab_size=len(tiny_tokenizer())).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    return root, folder, text


def _argv(folder, text, method, target, options, out, *extra):
    return ["prune", str(folder), "--method", method, "--target", target, *options, "--calib-data", str(text),
            *CALIB, "--out", str(out), *extra]


def _torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(setup):
    """Every method once in one process and once on 2 ranks (plus --stream on 2 ranks)."""
    root, folder, text = setup
    commands = []
    for method, target, options, stream in RUNS:
        commands.append({"argv": _argv(folder, text, method, target, options, root / "dp" / method), "rc": 0})
    for method, target, options, stream in RUNS + [(*DIRECT, [], True)]:
        if stream:
            commands.append({"argv": _argv(folder, text, method, target, options, root / "dp-stream" / method,
                                           "--stream"), "rc": 0})
    # a bad target fails every rank alike: one line, printed once
    commands.append({"argv": _argv(folder, text, "wanda_sp", "params=0.01", [], root / "dp" / "bad"), "rc": 2})
    spec = root / "commands.json"
    spec.write_text(json.dumps(commands))
    driver = _torchrun(str(ROOT / "tests" / "distributed_driver.py"), str(spec))
    direct = _torchrun("-m", "structlm.cli", *_argv(folder, text, *DIRECT, [], root / "dp" / DIRECT[0]))
    for method, target, options, _ in RUNS + [(*DIRECT, [], False)]:
        assert cli.main(_argv(folder, text, method, target, options, root / "one" / method)) == 0
    return root, driver, direct


def _close(a, b, path="plan") -> None:
    """Equal JSON, floats within 1e-6 relative (the order of the sums over ranks)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _same_checkpoint(one: Path, two: Path) -> None:
    _close(json.loads((one / "plan.json").read_text()), json.loads((two / "plan.json").read_text()))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = structlm.load(one)(ids).logits, structlm.load(two)(ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_the_launches_succeed_quietly(runs):
    _, driver, direct = runs
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    assert direct.returncode == 0, direct.stderr[-3000:]
    # only rank 0 prints: the plan and the saved line once, one progress bar (rank 1's go nowhere)
    assert direct.stdout.count("plan for llama") == 1 and direct.stdout.count("saved to") == 1, direct.stdout
    assert "Traceback" not in driver.stderr + direct.stderr


@pytest.mark.parametrize("method", [r[0] for r in RUNS] + [DIRECT[0]])
def test_two_ranks_give_the_single_process_plan_and_logits(runs, method):
    root, _, _ = runs
    _same_checkpoint(root / "one" / method, root / "dp" / method)
    report = json.loads((root / "dp" / method / "report.json").read_text())
    if method not in ("magnitude",):   # the calibration recorded is the whole set, not a rank's share
        recipe = json.loads((root / "dp" / method / "recipe.json").read_text())
        assert recipe["calibration"]["samples"] == 16
    assert report["stats"]["params_kept"] > 0


@pytest.mark.parametrize("method", [r[0] for r in RUNS if r[3]] + [DIRECT[0]])
def test_streaming_on_two_ranks_gives_the_in_memory_plan(runs, method):
    root, _, _ = runs
    _same_checkpoint(root / "one" / method, root / "dp-stream" / method)


def test_only_rank_0_writes_and_an_error_is_one_line_once(runs):
    root, driver, _ = runs
    assert sorted(p.name for p in (root / "dp").iterdir()) == sorted([r[0] for r in RUNS] + [DIRECT[0]])
    assert not [p for p in root.rglob("*") if ".partial-" in p.name or p.name.endswith(".lock")]
    lines = [line for line in driver.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "params=0.01" in lines[0] and lines[0].startswith("structlm prune: error:"), lines


def test_methods_that_cannot_share_their_work_refuse_in_one_line(monkeypatch):
    """Refusals that need no launch (a process group of 2 simulated by the helpers' world size):
    ziplm's evolutionary search, and fewer samples than ranks; how samples are shared."""
    from structlm import distributed
    from structlm.methods import _evo

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(distributed.DistributedError, match="search=evo does not run data-parallel"):
        _evo.parse_options({"search": "evo"}, ValueError)
    with pytest.raises(distributed.DistributedError, match="cannot be shared by 2 ranks"):
        distributed.shard_range(1, 8)
    assert distributed.shard_range(16, 8) == range(0, 8)        # rank 0: the first whole batch of 8
    assert distributed.shard_range(24, 8) == range(0, 16)       # 3 batches: rank 0 takes two
    assert distributed.shard_range(4, 8) == range(0, 2)         # one batch: its samples are spread


@pytest.mark.parametrize("size", [2, 3, 5])
def test_shares_cover_every_sample_once_in_whole_batches(monkeypatch, size):
    from structlm import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: size)
    for n, batch in [(32, 8), (30, 8), (16, 4), (10, 1), (7, 8), (5, 4)]:
        shares = []
        for r in range(size):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            shares.append(distributed.shard_range(n, batch))
        assert [i for s in shares for i in s] == list(range(n))            # contiguous, in order, each once
        assert all(len(s) > 0 for s in shares)
        if -(-n // batch) >= size:                                         # whole batches of a single process
            assert all(s.start % batch == 0 for s in shares)


def test_other_verbs_refuse_under_torchrun(setup, monkeypatch, capsys):
    _, folder, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["eval", str(folder), "--ppl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("structlm eval: error: structlm eval does not run data-parallel; only structlm prune does "
                   "(docs/scale.md): run it without torchrun")
