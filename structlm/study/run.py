"""``structlm.study``: run the criteria on every data source, cache each finished part in the
output folder (a second run with the same model, data and options reuses them and writes the
same ``study.json``), derive correlations and findings, and write the report."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import analysis
from .criteria import CRITERIA, LAYER_CRITERIA, WIDTH_CRITERIA, StudyError, compute, options_for, parse_criteria, sig

FORMAT = "structlm-study/1"
MARKER = ".structlm-study"
LAYER_CURVE_METHODS = ("finercut", "sleb", "shortgpt", "shortgpt_angular")
WIDTH_CURVE_METHODS = ("ziplm", "flap", "wanda_sp", "llm_pruner", "magnitude")
CURVE_METHODS = LAYER_CURVE_METHODS + WIDTH_CURVE_METHODS
DEFAULT_CURVES = ("finercut", "ziplm")
DEFAULT_POINTS = (0.05, 0.1, 0.15, 0.2)

DEFAULTS = dict(samples=16, seq_len=256, steps=4, seed=0, sleb_samples=4, taylor_samples=10, batch_size=8,
                damp=0.01, eval_tokens=8192, eval_seq_len=1024)


# ---- options ----------------------------------------------------------------------------------------

def parse_sources(spec) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    sources = [s.strip() for s in items if s and s.strip()]
    if not sources:
        raise StudyError("--data is empty; give 'wikipedia' and/or .txt/.jsonl files, comma-separated")
    if len(set(sources)) != len(sources):
        raise StudyError(f"--data names a source twice ({spec}); give each once")
    return sources


def parse_curves(spec) -> list[str]:
    if spec is None or spec is False:
        return []
    if spec is True or spec == "default":
        return list(DEFAULT_CURVES)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    from ..methods import canonical_name

    out = []
    for m in (canonical_name(x) for x in items if str(x).strip()):
        if m not in CURVE_METHODS:
            raise StudyError(f"--curves: unknown or unsupported method {m!r}; choose from {', '.join(CURVE_METHODS)}")
        if m not in out:
            out.append(m)
    return out or list(DEFAULT_CURVES)


def parse_points(spec) -> list[float]:
    if spec is None:
        return list(DEFAULT_POINTS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        points = sorted({float(x) for x in items if str(x).strip()})
    except ValueError:
        raise StudyError(f"--curve-points must be fractions of the parameters to remove, e.g. 0.1,0.2 (got {spec!r})") \
            from None
    if not points or not all(0 < p < 1 for p in points):
        raise StudyError(f"--curve-points must be fractions strictly between 0 and 1 (got {spec!r})")
    return points


def slug(source: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name or source)[:40]
    return base if source == base else f"{base}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def label(source: str) -> str:
    return source if source == "wikipedia" else Path(source).name


# ---- the cache ----------------------------------------------------------------------------------

def model_fingerprint(model, graph) -> str:
    h = hashlib.sha256(json.dumps({"family": graph.family, "config": graph.config}, sort_keys=True, default=str)
                       .encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:20]


class Parts:
    """Finished parts of a study under ``DIR/parts``, each a JSON file with the key it was computed
    for; a part is reused only when its key matches."""

    def __init__(self, out: Path):
        self.root = out / "parts"

    def path(self, group: str, name: str) -> Path:
        return self.root / group / f"{name}.json"

    def get(self, group: str, name: str, key: dict):
        p = self.path(group, name)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return d["result"] if isinstance(d, dict) and d.get("key") == key else None

    def put(self, group: str, name: str, key: dict, result: dict) -> None:
        from ..outputs import write_atomic

        p = self.path(group, name)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, (json.dumps({"key": key, "result": result}) + "\n").encode())


def prepare_out(out: Path, force: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file; give a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        if not force:
            raise StudyError(f"--out {out} is not empty and holds no study; choose another folder or add --force "
                             f"(which writes the study into it)")
    if force and (out / "parts").is_dir():
        shutil.rmtree(out / "parts")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("a structlm study folder: parts/ holds finished parts for resuming\n")
    except OSError as e:
        raise StudyError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


# ---- the study ----------------------------------------------------------------------------------------

def graph_info(graph, name: str) -> dict:
    acc = graph.accounting()
    layers = acc["layers"]
    return {"name": name, "family": graph.family, "n_layers": graph.n_layers, "hidden": graph.hidden,
            "heads": graph.n_heads, "kv_heads": graph.n_kv, "head_dim": graph.head_dim,
            "intermediate": graph.intermediate, "vocab": graph.vocab, "params": graph.total_params,
            "query_head_params": graph.group("query_head", 0).params_per_unit,
            "kv_group_params": graph.group("kv_group", 0).params_per_unit,
            "ffn_channel_params": graph.group("ffn_channel", 0).params_per_unit,
            "block_params": [int(layer["block"]) if isinstance(layer["block"], (int, float)) else
                             int(sum(layer["block"].values())) for layer in layers]}


def _calibration(source, tokenizer, calib, o) -> torch.Tensor:
    if calib is not None and source in calib:
        return calib[source]
    if tokenizer is None:
        raise StudyError(f"data source {source!r}: a tokenizer (or calib={{source: token ids}}) is needed")
    from ..data import calibration_samples

    return calibration_samples(tokenizer, o["samples"], o["seq_len"], source=source, seed=o["seed"])


def study(model, out, *, tokenizer=None, data=None, criteria="all", samples: int | None = None,
          seq_len: int | None = None, steps: int | None = None, curves=None, curve_points=None, calib: dict | None = None,
          force: bool = False, progress: bool = True, model_name: str | None = None, **options) -> dict:
    """Study ``model`` (a loaded causal LM, or a name for :func:`structlm.load_model`) and write
    ``out/report.md``, ``out/report.html``, ``out/study.json`` and ``out/figures/*.png``.

    ``data``: calibration sources ("wikipedia", .txt/.jsonl files; comma-separated or a list;
    default: the keys of ``calib``, else "wikipedia");
    ``criteria``: "all", "layers", "width" or a list of bi, angular, sleb, finercut, taylor,
    wanda, flap, obs; ``samples`` x ``seq_len`` calibration tokens per source; ``steps``: the
    greedy FinerCut steps; ``curves``: methods for held-out perplexity vs parameters removed
    (True: finercut and ziplm) at ``curve_points`` (fractions removed).  ``calib`` maps a source
    name to token ids [N, L] used instead of sampling (then no tokenizer is needed, except for
    curves).  Returns the study (what study.json holds)."""
    o = dict(DEFAULTS)
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise StudyError(f"study: unknown option(s) {', '.join(sorted(unknown))}; it takes: {', '.join(DEFAULTS)}")
    o.update(options)
    o.update({k: v for k, v in dict(samples=samples, seq_len=seq_len, steps=steps).items() if v is not None})
    for key in ("samples", "seq_len", "steps", "batch_size", "eval_tokens", "eval_seq_len"):
        if int(o[key]) < 1:
            raise StudyError(f"study: {key} must be >= 1 (got {o[key]})")
    names = parse_criteria(criteria)
    sources = parse_sources(data if data is not None else list(calib) if calib else "wikipedia")
    curve_methods = parse_curves(curves)
    points = parse_points(curve_points)
    if curve_methods and tokenizer is None and not isinstance(model, str):
        raise StudyError("cost curves need a tokenizer for the held-out perplexity (pass tokenizer=...)")
    out = prepare_out(Path(out), force)
    if isinstance(model, str):
        from ..models import load_model

        model_name = model_name or model
        model, tokenizer = load_model(model)
    from ..graph import build_graph

    graph = build_graph(model)
    info = graph_info(graph, model_name or getattr(model.config, "_name_or_path", "") or graph.family)
    fp = model_fingerprint(model, graph)
    parts = Parts(out)
    o["progress"] = progress
    if "finercut" in curve_methods:
        o["finercut_params"] = round(1 - max(points), 6)
    needs_steps = "finercut" in names or "finercut" in curve_methods
    if needs_steps and graph.n_layers < 2:
        raise StudyError("the model has one layer: there is nothing to compare")

    per_source: dict = {}
    calibs: dict = {}
    todo = [(s, c) for s in sources for c in names + (["finercut"] if "finercut" in curve_methods
                                                       and "finercut" not in names else [])]
    bar = tqdm(todo, desc="study", unit="part", disable=not progress)
    for source, name in bar:
        if source not in calibs:
            calibs[source] = _calibration(source, tokenizer, calib, o)
        c = calibs[source]
        key = {"model": fp, "calibration": tensor_hash(c), "criterion": name, "options": options_for(name, o)}
        result = parts.get(slug(source), name, key)
        bar.set_postfix_str(f"{label(source)}: {name}{' (cached)' if result is not None else ''}")
        if result is None:
            result = compute(name, model, graph, c, o)
            parts.put(slug(source), name, key, result)
        entry = per_source.setdefault(source, {"calibration": {"samples": int(c.shape[0]), "seq_len": int(c.shape[1]),
                                                               "sha256": tensor_hash(c)}, "criteria": {}})
        entry["criteria"][name] = result
    bar.close()
    for source in sources:
        per_source[source]["criteria"] = {k: per_source[source]["criteria"][k]
                                          for k in CRITERIA if k in per_source[source]["criteria"]}

    result = {"format": FORMAT, "model": info,
              "options": {"data": sources, "criteria": names, "samples": o["samples"], "seq_len": o["seq_len"],
                          "steps": o["steps"], "seed": o["seed"], "sleb_samples": o["sleb_samples"],
                          "taylor_samples": o["taylor_samples"], "damp": o["damp"],
                          "curves": curve_methods, "curve_points": points if curve_methods else None},
              "sources": {}}
    for source in sources:
        crit = per_source[source]["criteria"]
        result["sources"][source] = {"label": label(source), **per_source[source],
                                     "derived": derived(crit, info, o["steps"])}
    result["correlations"] = {"criteria": {s: analysis.criteria_correlations(
        {k: v for k, v in result["sources"][s]["criteria"].items() if k in names}) for s in sources},
        "sources": analysis.source_correlations({s: {k: v for k, v in result["sources"][s]["criteria"].items()
                                                     if k in names} for s in sources}) if len(sources) > 1 else []}
    result["curves"] = None
    if curve_methods:
        result["curves"] = cost_curves(model, tokenizer, graph, curve_methods, points, sources[0], calibs[sources[0]],
                                       result["sources"][sources[0]]["criteria"], parts, fp, o)
    from . import findings, report

    result["findings"] = findings.generate(result)
    report.write(result, graph, out)
    return result


def derived(crit: dict, info: dict, steps: int) -> dict:
    n = info["n_layers"]
    k = min(8, max(1, n // 2))
    d: dict = {}
    for name in ("angular", "finercut"):
        if name in crit:
            d[f"{name}_least_important"] = analysis.least_important_sublayers(crit[name], n, k)
    for name in ("bi", "sleb"):
        if name in crit:
            low = sorted(range(n), key=lambda i: (crit[name]["block"][i], i))[:min(k, n - 1)]
            d[f"{name}_least_important"] = {"k": len(low), "blocks": low}
    if "finercut" in crit:
        d["finercut_order"] = analysis.order_summary(crit["finercut"]["order"][:steps], n)
    for name in WIDTH_CRITERIA:
        if name in crit:
            d[f"{name}_cheapest"] = analysis.cheapest_by_depth(crit[name], info, name)
            d[f"{name}_ffn_quantiles"] = analysis.ffn_quantiles(crit[name])
    return d


# ---- cost curves --------------------------------------------------------------------------------------

def _evaluate(model, tokenizer, plan, graph, source, o) -> float:
    from ..evaluate import perplexity
    from ..surgery import shrink

    pruned = copy.deepcopy(model) if plan is not None else model
    if plan is not None:
        shrink(pruned, plan, graph)
    r = perplexity(pruned, tokenizer, seq_len=o["eval_seq_len"], max_tokens=o["eval_tokens"], source=source,
                   progress=False)
    del pruned
    return r["ppl"]


def _layer_plans(graph, order: list[dict], points: list[float]):
    """The shortest prefix of a removal order that removes at least each point's fraction."""
    from ..methods._layers import plan_from_removed

    removed, plans, total = [], {}, graph.total_params
    for entry in order:
        removed.append((entry["layer"], entry["sublayer"]))
        plan = plan_from_removed(graph, removed)
        kept = plan.cost(graph)["params"] / total
        for p in points:
            if p not in plans and kept <= 1 - p + 1e-12:
                plans[p] = (plan, len(removed))
    return plans


def cost_curves(model, tokenizer, graph, methods_, points, source, calib, crit, parts, fp, o) -> dict:
    """Held-out perplexity vs fraction of parameters removed, per method.  Layer methods: the
    prefixes of one removal order (FinerCut's is the study's own greedy search, run to the deepest
    point); ZipLM: one level database for every point; the other width methods score per point."""
    from .. import methods
    from ..targets import Target

    heldout = {"source": source, "tokens": o["eval_tokens"], "window": o["eval_seq_len"]}
    base_key = {"model": fp, "calibration": tensor_hash(calib), "heldout": heldout}
    dense = parts.get("curves", "dense", base_key)
    if dense is None:
        dense = {"ppl": sig(_evaluate(model, tokenizer, None, graph, source, o))}
        parts.put("curves", "dense", base_key, dense)
    out = {"heldout": heldout, "dense_ppl": dense["ppl"], "methods": {}}
    for name in tqdm(methods_, desc="cost curves", unit="method", disable=not o["progress"]):
        key = {**base_key, "method": name, "points": points,
               "options": options_for("finercut", o) if name == "finercut" else {}}
        r = parts.get("curves", name, key)
        if r is None:
            rows = []
            if name in LAYER_CURVE_METHODS:
                if name == "finercut":
                    order = crit["finercut"]["order"]
                else:
                    _, info = methods.get(name)(model, graph, Target("params", 1 - max(points)), calib,
                                                **({"progress": o["progress"]} if name == "sleb" else {}))
                    order = info["removal_order"]
                for p, (plan, n_removed) in sorted(_layer_plans(graph, order, points).items()):
                    rows.append({"removed": p, "kept": sig(plan.cost(graph)["params_ratio"], 5), "units": n_removed,
                                 "ppl": sig(_evaluate(model, tokenizer, plan, graph, source, o))})
            else:
                fn = methods.get(name)
                opts = {"progress": o["progress"]} if name == "ziplm" else {}
                if hasattr(fn, "prepare"):
                    opts = fn.prepare(model, graph, calib, opts)
                for p in points:
                    plan, _ = fn(model, graph, Target("params", round(1 - p, 6)), calib, **dict(opts))
                    rows.append({"removed": p, "kept": sig(plan.cost(graph)["params_ratio"], 5),
                                 "ppl": sig(_evaluate(model, tokenizer, plan, graph, source, o))})
            r = {"points": rows}
            parts.put("curves", name, key, r)
        out["methods"][name] = r
    return out


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
