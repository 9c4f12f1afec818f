"""Zero-shot scoring: lm-eval's prompts, context/continuation split, hand-computed log-likelihoods,
acc vs acc_norm, WinoGrande partial scoring, batching invariance, and the real SmolLM2."""

from __future__ import annotations

import math
import re
import types

import pytest
import torch

from structlm import zeroshot as zs
from structlm.models import NonFiniteError
from helpers import tiny_llama, tiny_tokenizer
from tiny_models import tiny_model


# ---------------------------------------------------------------------------------------------
# A word-level tokenizer (GPT-2 style: a space belongs to the word after it) and a bigram model
# whose log-probabilities are easy to compute by hand
# ---------------------------------------------------------------------------------------------

class WordTokenizer:
    """``" ?word | ?punctuation|whitespace"`` pieces; ids in order of first appearance."""

    pattern = re.compile(r" ?\w+| ?[^\w\s]+|\s+")

    def __init__(self, bos: str | None = "<s>", eos: str = "</s>"):
        self.vocab: dict[str, int] = {}
        self.bos_token = bos
        self.eos_token = eos
        self.bos_token_id = self._id(bos) if bos else None
        self.eos_token_id = self._id(eos)
        self.pad_token_id = None

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def pieces(self, text: str) -> list[str]:
        out = []
        if self.bos_token and text.startswith(self.bos_token):
            out.append(self.bos_token)
            text = text[len(self.bos_token):]
        return out + self.pattern.findall(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self._id(p) for p in self.pieces(text)]


class Bigram(torch.nn.Module):
    """logits at position t = table[token t]: log P(cont | ctx) = sum of log_softmax(table[prev])[next].
    Supports right padding, a mask, position ids and a (stateless) KV cache, so both scoring paths run."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.config = types.SimpleNamespace(max_position_embeddings=64)

    class Cache:
        def batch_select_indices(self, indices):
            self.selected = indices

    def forward(self, input_ids, attention_mask=None, use_cache=False, cache=None, position_ids=None):
        return types.SimpleNamespace(logits=self.table[input_ids],
                                     cache=(cache or self.Cache()) if use_cache else None)


def logp(table, prev, nxt) -> float:
    row = table[prev].double()
    return float(row[nxt] - torch.logsumexp(row, 0))


# ---------------------------------------------------------------------------------------------
# Context / continuation split
# ---------------------------------------------------------------------------------------------

def test_trailing_space_of_the_context_moves_to_the_continuation():
    tok = WordTokenizer()
    ctx, cont = zs.encode_pair(tok, "Question: hi\nAnswer: ", "yes")
    assert ctx == tok.encode("Question: hi\nAnswer:")
    assert cont == tok.encode(" yes") and len(cont) == 1
    # without the move the space would be its own context token and "yes" would lose its space
    assert tok.encode("Question: hi\nAnswer: ")[-1] == tok.vocab[" "]


def test_continuation_tokens_are_whole_minus_context():
    tok = WordTokenizer()
    ctx, cont = zs.encode_pair(tok, "Answer:", " the cat.")
    assert ctx + cont == tok.encode("Answer: the cat.")
    assert [p for p in tok.vocab if tok.vocab[p] in cont] == [" the", " cat", "."]


def test_empty_context_uses_bos_then_eos():
    tok = WordTokenizer()
    assert zs.encode_pair(tok, "", " hello world") == ([tok.bos_token_id], tok.encode(" hello world"))
    # a continuation that already starts with BOS gives its own first token as the context
    ctx, cont = zs.encode_pair(tok, "", "<s> hello")
    assert ctx == [tok.bos_token_id] and cont == tok.encode(" hello")
    no_bos = WordTokenizer(bos=None)
    assert zs.encode_pair(no_bos, "", " hi")[0] == [no_bos.eos_token_id]


# ---------------------------------------------------------------------------------------------
# Log-likelihoods by hand
# ---------------------------------------------------------------------------------------------

def _hand_case():
    tok = WordTokenizer()
    requests = [("Q: sky\nA:", " blue"), ("Q: sky\nA:", " green sky"), ("Q: sky\nA: ", "red"),
                ("Q: grass\nA:", " green"), ("", " blue sky"), ("Q: sky\nA:", " blue sky blue")]
    encoded = [zs.encode_pair(tok, c, x) for c, x in requests]
    vocab = max(max(c + x) for c, x in encoded) + 1
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 2
    return tok, requests, encoded, table


@pytest.mark.parametrize("batch_size,share", [(1, False), (2, True), (16, True), (16, False)])
def test_loglikelihoods_equal_a_hand_computation(batch_size, share):
    tok, requests, encoded, table = _hand_case()
    expected = []
    for ctx, cont in encoded:
        seq = ctx + cont
        expected.append(sum(logp(table, seq[i - 1], seq[i]) for i in range(len(ctx), len(seq))))
    got = zs.loglikelihoods(Bigram(table), tok, requests, batch_size=batch_size, share_context=share)
    assert got == pytest.approx(expected, abs=1e-5)
    # spot check one by hand: " blue" after "Q: sky\nA:" is one bigram step from ":"
    assert got[0] == pytest.approx(logp(table, tok.vocab[":"], tok.vocab[" blue"]), abs=1e-5)


def test_long_requests_are_left_truncated_like_lm_eval():
    tok, requests, encoded, table = _hand_case()
    model = Bigram(table)
    model.config.max_position_embeddings = 3  # inputs keep the last max_length + 1 tokens, minus the last
    got = zs.loglikelihoods(model, tok, [requests[5]], batch_size=4)
    ctx, cont = encoded[5]
    seq = ctx + cont
    assert got[0] == pytest.approx(sum(logp(table, seq[i - 1], seq[i]) for i in range(len(ctx), len(seq))), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def test_acc_and_acc_norm_can_disagree_by_length_normalisation():
    item = zs.Item(requests=(("Q", " a"), ("Q", " bbbbbbbb")), choices=("a", "bbbbbbbb"), gold=1)
    # raw: -2 > -4 picks the short choice; per character: -2/1 < -4/8 picks the long one
    assert zs.score_item(item, [-2.0, -4.0]) == (0.0, 1.0)
    assert zs.score_item(item, [-2.0, -40.0]) == (0.0, 0.0)
    # ties go to the first choice, like numpy.argmax
    assert zs.score_item(zs.Item(item.requests, ("x", "y"), 1), [-1.0, -1.0]) == (0.0, 0.0)


def test_score_items_reports_mean_and_sample_stderr():
    spec = zs.TASKS["arc_easy"]
    items = [zs.Item((("c", " a"), ("c", " bb")), ("a", "bb"), g) for g in (0, 1, 1)]
    lls = [-1.0, -1.5, -1.0, -1.5, -3.0, -1.0]  # preds (acc / per char): 0 / 1, 0 / 1, 1 / 1
    result = zs.score_items(spec, items, lls)
    assert result["acc"] == pytest.approx(2 / 3) and result["acc_norm"] == pytest.approx(2 / 3)
    assert result["n"] == 3
    assert result["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) / math.sqrt(3))
    assert zs.score_items(zs.TASKS["boolq"], items, lls)["acc_norm"] is None


# ---------------------------------------------------------------------------------------------
# Prompts: lm-eval's doc_to_text / doc_to_choice / doc_to_target
# ---------------------------------------------------------------------------------------------

def test_arc_prompt_and_numeric_answer_keys():
    doc = {"question": "Which is a gas?", "answerKey": "3",
           "choices": {"text": ["rock", "water", "steam", "ice"], "label": ["1", "2", "3", "4"]}}
    item = zs.TASKS["arc_easy"].build(doc)
    assert item.requests[0] == ("Question: Which is a gas?\nAnswer:", " rock")
    assert item.choices == ("rock", "water", "steam", "ice") and item.gold == 2
    doc["answerKey"], doc["choices"]["label"] = "B", ["A", "B", "C", "D"]
    assert zs.TASKS["arc_challenge"].build(doc).gold == 1


def test_piqa_boolq_openbookqa_prompts():
    piqa = zs.TASKS["piqa"].build({"goal": "Dry a towel", "sol1": "hang it", "sol2": "soak it", "label": 0})
    assert piqa.requests == (("Question: Dry a towel\nAnswer:", " hang it"),
                             ("Question: Dry a towel\nAnswer:", " soak it"))
    boolq = zs.TASKS["boolq"].build({"passage": "Cats purr.", "question": "do cats purr", "answer": True})
    assert boolq.requests == (("Cats purr.\nQuestion: do cats purr?\nAnswer:", " no"),
                              ("Cats purr.\nQuestion: do cats purr?\nAnswer:", " yes"))
    assert boolq.gold == 1 and boolq.choices == ("no", "yes")
    obqa = zs.TASKS["openbookqa"].build({"question_stem": "The sun is", "answerKey": " B",
                                        "choices": {"text": ["cold", "hot"], "label": ["A", "B"]}})
    assert obqa.requests[1] == ("The sun is", " hot") and obqa.gold == 1


def test_hellaswag_preprocessing():
    assert zs.hellaswag_preprocess(" How to cook [title] Boil water. [step] Add salt. ") == \
        "How to cook. Boil water. Add salt."
    doc = {"activity_label": "Cooking", "ctx_a": "A man boils water.", "ctx_b": "then HE",
           "endings": ["adds salt [header].", " stirs it."], "label": "1"}
    item = zs.TASKS["hellaswag"].build(doc)
    # ctx_b.capitalize() lowercases the rest
    assert item.requests == (("Cooking: A man boils water. Then he", " adds salt ."),
                             ("Cooking: A man boils water. Then he", " stirs it."))
    assert item.gold == 1


def test_winogrande_partial_scoring_construction():
    doc = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    item = zs.TASKS["winogrande"].build(doc)
    assert item.requests == (("Sarah was a better surgeon than Maria so Sarah", " got the easier cases."),
                             ("Sarah was a better surgeon than Maria so Maria", " got the easier cases."))
    assert item.gold == 1 and item.choices == tuple(c for c, _ in item.requests)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'arc_hard'.*known tasks: arc_easy, arc_challenge, piqa"):
        zs.check_tasks(["arc_easy", "arc_hard"])
    with pytest.raises(ValueError, match="known tasks"):
        zs.evaluate_zero_shot(None, None, ["mmlu"])


def test_evaluate_zero_shot_end_to_end_on_a_local_set(tmp_path):
    """A two-item ARC set saved with datasets: the bigram model's answers are checked by hand."""
    from datasets import Dataset

    docs = [{"id": "1", "question": "sky", "answerKey": "A",
             "choices": {"text": ["blue", "green grass"], "label": ["A", "B"]}},
            {"id": "2", "question": "grass", "answerKey": "B",
             "choices": {"text": ["blue", "green grass"], "label": ["A", "B"]}},
            {"id": "3", "question": "unused", "answerKey": "A",
             "choices": {"text": ["blue", "green"], "label": ["A", "B"]}}]
    Dataset.from_list(docs).save_to_disk(str(tmp_path / "ai2_arc/ARC-Easy/validation"))
    tok = WordTokenizer()
    for piece in ["Question", ":", " sky", "\n", "Answer", " grass", " blue", " green"]:
        tok.encode(piece)
    table = torch.zeros(len(tok.vocab), len(tok.vocab))
    table[tok.vocab[":"], tok.vocab[" blue"]] = 1.0  # " blue" slightly likelier than " green" after ":"
    table[tok.vocab[" green"], tok.vocab[" grass"]] = 10.0  # and " grass" almost certain after " green"
    out = zs.evaluate_zero_shot(Bigram(table), tok, ["arc_easy"], limit=2, progress=False, root=tmp_path)
    r = out["arc_easy"]
    # raw log-likelihood prefers " blue" (one token), per-character prefers " green grass": gold A then B
    assert (r["acc"], r["acc_norm"], r["n"]) == (0.5, 0.5, 2)
    assert out["average"]["average_acc"] == 0.5 and out["average"]["average_paper"] == 0.5

    table[tok.vocab[":"], tok.vocab[" green"]] = float("nan")  # NaN compares false: argmax would pick A
    with pytest.raises(NonFiniteError, match="zero-shot arc_easy: 4 of 4 log-likelihoods are not finite"):
        zs.evaluate_zero_shot(Bigram(table), tok, ["arc_easy"], limit=2, progress=False, root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Batching and context sharing do not change the numbers (tiny random transformers)
# ---------------------------------------------------------------------------------------------

def _batching_requests():
    return [("The quick brown fox", " jumps"), ("The quick brown fox", " sleeps over the lazy dog"),
            ("The quick brown fox", " ran."), ("The quick brown fox ", "jumps high"),
            ("A", " b"), ("", " lonely continuation here"), ("Once upon a time there was", " a king"),
            ("Once upon a time there was", " a"), ("Short", " one two three four five six"),
            ("Once upon a time there was a king who", " ruled"), ("Once upon a time there was a king who", " slept")]


def test_batched_equals_one_at_a_time_on_a_tiny_llama():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    requests = _batching_requests()
    alone = [zs.loglikelihoods(model, tok, [r], batch_size=1, share_context=False)[0] for r in requests]
    for batch_size, share in [(1, True), (3, True), (16, True), (5, False), (16, False)]:
        got = zs.loglikelihoods(model, tok, requests, batch_size=batch_size, share_context=share)
        assert got == pytest.approx(alone, abs=2e-4), (batch_size, share)
    assert all(x < 0 for x in alone)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gpt2"])
def test_batched_equals_one_at_a_time_on_other_families(family):
    tok = tiny_tokenizer()
    model = tiny_model(family, vocab_size=max(len(tok), 128))
    requests = _batching_requests()
    alone = [zs.loglikelihoods(model, tok, [r], batch_size=1, share_context=False)[0] for r in requests]
    got = zs.loglikelihoods(model, tok, requests, batch_size=7, share_context=True)
    assert got == pytest.approx(alone, abs=2e-4)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2
# ---------------------------------------------------------------------------------------------

def _zero_shot_root():
    from conftest import _real_or_skip
    from structlm import assets

    return _real_or_skip(lambda: assets.fetch("zero-shot"))


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_is_well_above_chance_on_arc_easy_and_piqa(smollm2):
    torch.set_num_threads(2)
    model, tok = smollm2
    root = _zero_shot_root()
    out = zs.evaluate_zero_shot(model, tok, ["arc_easy", "piqa"], limit=50, batch_size=16, progress=False, root=root)
    assert out["arc_easy"]["n"] == 50 and out["piqa"]["n"] == 50
    # chance is 0.25 (ARC, 4 choices) and 0.5 (PIQA); the standard error at n=50 is about 0.07
    assert out["arc_easy"]["acc"] >= 0.40, out
    assert out["piqa"]["acc"] >= 0.58, out
    assert 0.0 <= out["arc_easy"]["acc_norm"] <= 1.0


@pytest.mark.real
def test_smollm2_prompt_tokens_and_sharing(smollm2):
    model, tok = smollm2
    ctx, cont = zs.encode_pair(tok, "Question: Which is a gas?\nAnswer: ", "steam")
    assert tok.decode(ctx) == "Question: Which is a gas?\nAnswer:" and tok.decode(cont) == " steam"
    requests = [("Question: Which is a gas?\nAnswer:", " " + c) for c in ["rock", "liquid water", "steam"]]
    requests += [("The capital of France is", " Paris"), ("The capital of France is", " a banana")]
    shared = zs.loglikelihoods(model, tok, requests, batch_size=8)
    alone = [zs.loglikelihoods(model, tok, [r], batch_size=1, share_context=False)[0] for r in requests]
    assert shared == pytest.approx(alone, abs=1e-3)
    assert shared[3] > shared[4] + 3  # a sanity check of the model, not of the split
