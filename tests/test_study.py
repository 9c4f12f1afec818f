"""structlm study: every criterion in study.json is what the method's own scorer computes on the
same calibration data; a resumed study writes the same JSON without recomputing; the CLI writes
every file and refuses bad input with one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import structlm
from structlm import cli
from structlm.graph import build_graph
from structlm.study import criteria as C
from structlm.targets import Target
from helpers import SAMPLE_TEXT, tiny_llama, tiny_tokenizer
from tiny_models import tiny_model

STEPS = 3


def close(a, b, rel=1e-5, abs_tol=1e-12):
    a, b = list(map(float, a)), list(map(float, b))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rel, abs_tol=abs_tol), (x, y)


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    model = tiny_model("llama", num_hidden_layers=4)
    g = torch.Generator().manual_seed(0)
    calib = {"a": torch.randint(3, 128, (10, 16), generator=g), "b": torch.randint(3, 128, (10, 16), generator=g)}
    out = tmp_path_factory.mktemp("study")
    result = structlm.study(model, out, data="a,b", calib=calib, steps=STEPS, progress=False)
    return model, build_graph(model), calib, out, result


def test_layer_criteria_are_the_methods_scores(studied):
    from structlm.methods.finercut import finercut
    from structlm.methods.shortgpt import shortgpt, shortgpt_angular
    from structlm.methods.sleb import sleb

    model, graph, calib, _, result = studied
    for source in ("a", "b"):
        crit, c = result["sources"][source]["criteria"], calib[source]
        _, info = shortgpt(model, graph, Target("blocks", 1), c)
        close(crit["bi"]["block"], info["block_influence"])
        _, info = shortgpt_angular(model, graph, Target("sublayers", 1), c)
        close(crit["angular"]["attention"], info["angular"]["attention"])
        close(crit["angular"]["ffn"], info["angular"]["ffn"])
        _, info = sleb(model, graph, Target("blocks", 1), c, screen_samples=crit["sleb"]["samples"], progress=False)
        scores = info["steps"][0]["candidate_scores"]
        close(crit["sleb"]["removed_nll"], [scores[f"{i}.block"] for i in range(graph.n_layers)])
        dense = crit["sleb"]["dense_ppl"]
        # dense_ppl is stored to 7 significant digits, so the differences carry an absolute error of that size
        close(crit["sleb"]["block"], [math.exp(scores[f"{i}.block"]) - dense for i in range(graph.n_layers)], 1e-4,
              abs_tol=1e-6 * dense)
        _, info = finercut(model, graph, Target("sublayers", STEPS), c, progress=False)
        scores = info["steps"][0]["candidate_scores"]
        for kind in ("attention", "ffn"):
            close(crit["finercut"][kind], [scores[f"{i}.{kind}"] for i in range(graph.n_layers)])
        assert [(o["layer"], o["sublayer"]) for o in crit["finercut"]["order"]] == \
            [(o["layer"], o["sublayer"]) for o in info["removal_order"]]
        close([o["score"] for o in crit["finercut"]["order"]], [o["score"] for o in info["removal_order"]])


def test_width_criteria_are_the_methods_scores(studied):
    from structlm import methods

    model, graph, calib, _, result = studied
    for source in ("a", "b"):
        crit, c = result["sources"][source]["criteria"], calib[source]
        # each method's own report of its KV-group scores (all layers: the tiny model has < 8)
        # (the study's taylor sums each KV group's own query heads: llm_pruner's kv_fold=grouped)
        for name, method, opts in (("wanda", "wanda_sp", {}), ("flap", "flap", {}),
                                   ("taylor", "llm_pruner", {"kv_fold": "grouped"})):
            _, info = methods.get(method)(model, graph, "params=0.9", c, **opts)
            for i in range(graph.n_layers):
                close(crit[name]["kv_group"][i], info["scores"][f"kv_group/{i}"], 1e-4)
        # and the scorers themselves for every kind
        from structlm.methods.flap import flap_scores
        from structlm.methods.wanda_sp import wanda_sp_scores

        layers = list(range(graph.n_layers))
        w = wanda_sp_scores(model, graph, c, layers, kinds=C.WIDTH_KINDS)
        f, _, _ = flap_scores(model, graph, c, layers, kinds=("query_head", "kv_group"))
        for i in layers:
            for kind in C.WIDTH_KINDS:
                close(crit["wanda"][kind][i], w[(kind, i)].tolist(), 1e-5)
                close(crit["flap"][kind][i], f[(kind, i)].tolist(), 1e-5)


def test_obs_saliency_is_the_error_of_the_least_squares_refit(studied):
    """ZipLM's saliency of one structure alone equals the squared output error of re-fitting the
    layer without it (structlm.obs), per calibration token."""
    from structlm.calibration import Sequential
    from structlm.methods.ziplm import _projections, _weight
    from structlm.obs import dampen, error, least_squares

    model, graph, calib, _, result = studied
    obs = result["sources"]["a"]["criteria"]["obs"]
    seq = Sequential(model, calib["a"])
    seq.advance(0)
    i = 1
    o, down = _projections(model, i)
    names = [o.weight.rpartition(".")[0], down.weight.rpartition(".")[0]]
    stats = seq.collect(i, names)
    for proj, name, removed, value in ((o, names[0], list(range(graph.head_dim, 2 * graph.head_dim)),
                                        obs["query_head"][i][1]),
                                       (down, names[1], [5], obs["ffn_channel"][i][5])):
        h = dampen(stats[name].matrix(), obs["damp"])
        w = _weight(model, proj)
        kept = torch.tensor([j for j in range(w.shape[1]) if j not in removed])
        assert math.isclose(error(w, least_squares(w, h, kept), h, kept), value, rel_tol=1e-4)


def test_study_json_is_complete(studied):
    model, graph, _, out, result = studied
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["format"] == "structlm-study/1"
    assert set(on_disk["sources"]["a"]["criteria"]) == set(C.CRITERIA)
    for name in C.WIDTH_CRITERIA:
        r = on_disk["sources"]["a"]["criteria"][name]
        assert len(r["query_head"]) == graph.n_layers and len(r["query_head"][0]) == graph.n_heads
        assert len(r["kv_group"][0]) == graph.n_kv and len(r["ffn_channel"][0]) == graph.intermediate
    units = {(r["units"], r["a"], r["b"]) for r in on_disk["correlations"]["criteria"]["a"]}
    assert ("block", "bi", "sleb") in units and ("sublayer", "angular", "finercut") in units
    assert ("query_head", "taylor", "obs") in units
    assert {r["criterion"] for r in on_disk["correlations"]["sources"]} == set(C.CRITERIA)
    assert len(on_disk["sources"]["a"]["criteria"]["finercut"]["order"]) == STEPS
    assert on_disk["findings"] and all(isinstance(s, str) for s in on_disk["findings"])
    for path in on_disk["figures"].values():
        assert (out / path).stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(on_disk["figures"])
    md = (out / "report.md").read_text()
    assert all(f"({p})" in md for p in on_disk["figures"].values())


def test_resume_reuses_every_part_and_writes_the_same_json(studied, monkeypatch):
    model, _, calib, out, _ = studied
    before = (out / "study.json").read_bytes()

    def refuse(*a, **k):
        raise AssertionError("a cached part was recomputed")
    monkeypatch.setattr(C, "SCORERS", {k: refuse for k in C.SCORERS})
    structlm.study(model, out, data="a,b", calib=calib, steps=STEPS, progress=False)
    assert (out / "study.json").read_bytes() == before


def test_a_changed_option_recomputes_only_its_part(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    calib = {"a": torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(1))}
    structlm.study(model, tmp_path, calib=calib, criteria="bi,finercut", steps=1, progress=False)
    calls = []
    original = dict(C.SCORERS)
    try:
        for k in original:
            C.SCORERS[k] = (lambda name: lambda *a, **kw: calls.append(name) or original[name](*a, **kw))(k)
        r = structlm.study(model, tmp_path, calib=calib, criteria="bi,finercut", steps=2, progress=False)
    finally:
        C.SCORERS.update(original)
    assert calls == ["finercut"]
    assert len(r["sources"]["a"]["criteria"]["finercut"]["order"]) == 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(layers=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = folder.parent / "fiction.txt"
    text.write_text(SAMPLE_TEXT * 4)
    return folder, text


def test_cli_writes_every_file_with_curves(tiny_folder, tmp_path, capsys):
    folder, text = tiny_folder
    out = tmp_path / "s"
    argv = ["study", str(folder), "--out", str(out), "--data", str(text), "--samples", "4", "--seq-len", "16",
            "--steps", "2", "--criteria", "bi,angular,finercut,wanda,flap", "--curves", "shortgpt,flap",
            "--curve-points", "0.1,0.2", "--eval-tokens", "64", "--eval-seq-len", "32", "--threads", "1", "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "written to" in printed
    for name in ("report.md", "report.html", "study.json"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "study.json").read_text())
    curves = result["curves"]
    assert set(curves["methods"]) == {"shortgpt", "flap"} and curves["dense_ppl"] > 1
    for r in curves["methods"].values():
        assert r["points"] and all(p["kept"] <= 1 - p["removed"] + 1e-9 and p["ppl"] > 1 for p in r["points"])
    assert (out / "figures" / "cost_curves.png").is_file()
    assert cli.main(argv) == 0      # resumed: same JSON
    assert json.loads((out / "study.json").read_text()) == result


@pytest.mark.parametrize("extra, message", [
    (["--criteria", "bi,nope"], "unknown criterion 'nope'"),
    (["--data", "/nonexistent/code.txt"], "no such file"),
    (["--curves", "last_blocks"], "unknown or unsupported method"),
    (["--curve-points", "0,0.5"], "strictly between 0 and 1"),
])
def test_bad_input_is_one_clear_line(tiny_folder, tmp_path, capsys, extra, message):
    folder, _ = tiny_folder
    assert cli.main(["study", str(folder), "--out", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_non_study_folder_is_refused(tiny_folder, tmp_path, capsys):
    folder, _ = tiny_folder
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["study", str(folder), "--out", str(tmp_path)]) == 2
    assert "not empty and holds no study" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
