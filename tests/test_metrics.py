import pytest
import torch

from titok.core.excess import text_logprobs
from titok.core.metrics import answer_spread, collapse_text, collapsed, exact_match, exact_matches, extract_answer, majority_rate, option_loglik_choices, rouge
from titok.core.sequences import encode_pair
from tests.conftest import tiny_llama


def test_answer_extraction_hand_cases():
    assert extract_answer("not True = False. So the answer is False.") == "False"
    assert extract_answer("Step one. The answer is: (B)\nmore text") == "(B)"
    assert extract_answer("the answer is 3. Wait, the answer is 4.") == "4"
    assert extract_answer("\n  True.\nbecause") == "True"
    assert extract_answer("") == ""


def test_an_option_letter_target_matches_an_answer_that_names_the_option():
    predictions = ["(C) yellow ball", "So the answer is (C).", "(c)", "(B) yellow ball", "yellow ball", "C", "(C)(A)"]
    assert exact_matches(predictions, ["(C)"] * len(predictions)) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # a target that is not an option letter still needs the whole answer
    assert exact_matches(["True enough", "(A) True"], ["True", "(A) True"]) == [0.0, 1.0]


def test_exact_match_and_majority():
    assert exact_match(["So the answer is True.", "false", "maybe"], ["True", "False", "True"]) == pytest.approx(2 / 3)
    assert majority_rate(["True", "true", "False", "True"]) == 0.75
    with pytest.raises(ValueError):
        exact_match([], [])


def test_rouge_hand_checked():
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    # ROUGE-1: P = 3/3, R = 3/6 -> F1 = 2/3; the LCS is the same 3 tokens
    assert scores["rouge1"] == pytest.approx(2 / 3) and scores["rougeL"] == pytest.approx(2 / 3)


def test_option_loglik_picks_the_option_the_model_prefers(smollm2_tokenizer):
    model = tiny_llama(smollm2_tokenizer)
    queries, options = ["Is it True or False?", "Pick a letter"], [["True", "False"], ["(A)", "(B)", "(C)"]]
    choices = option_loglik_choices(lambda q, r: text_logprobs(model, smollm2_tokenizer, q, r, batch_size=2),
                                    queries, options)
    # reference: one option at a time, mean log-prob over its tokens
    for query, query_options, choice in zip(queries, options, choices):
        means = []
        for option in query_options:
            pair = encode_pair(smollm2_tokenizer, query, option)
            ids = torch.tensor([pair.prompt_ids + pair.response_ids])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            means.append(logprobs[-len(pair.response_ids):].mean().item())
        assert choice == max(range(len(means)), key=means.__getitem__)


def test_one_answer_to_everything_is_a_collapse_whatever_its_accuracy():
    targets = ["True", "False"] * 25
    # an evaluation's report: n, the majority rate, the spread of answers
    report = {"n": 50, "majority_rate": majority_rate(targets),
              **answer_spread(["the answer is False."] * 49 + ["True"], targets)}
    assert report["top_prediction"] == "false" and report["top_prediction_share"] == 0.98
    assert report["predictions_by_answer"] == {"false": 49, "true": 1} and report["targets_by_answer"] == {"true": 25, "false": 25}
    assert collapsed(report) and collapse_text(report).startswith("answers 'false' to 49 of 50 examples (98%)")
    varied = {"n": 50, "majority_rate": majority_rate(targets), **answer_spread(["True"] * 30 + ["False"] * 20, targets)}
    assert not collapsed(varied)  # 60%: a lean, not a collapse
    uniform_gold = {"n": 10, "majority_rate": majority_rate(["yes"] * 10), **answer_spread(["yes"] * 10, ["yes"] * 10)}
    assert not collapsed(uniform_gold)  # the gold is one answer too: answering it is right, not collapsed


def test_an_option_named_with_its_text_is_one_answer_for_every_metric():
    """A base that answers "(A) <any colour> ball" to every question answers (A): exact match credits it
    where (A) is right, and the spread and the share answered count it as (A), so the collapse shows."""
    from titok.core.metrics import answered

    targets = ["(A)", "(B)", "(C)", "(A)"] * 25
    predictions = [f"So the answer is (A) {colour} ball." for colour in ("red", "blue", "pink", "white")] * 25
    assert exact_match(predictions, targets) == 0.5
    report = {"n": 100, "majority_rate": majority_rate(targets), **answer_spread(predictions, targets)}
    assert report["top_prediction"] == "(a)" and report["predictions_by_answer"] == {"(a)": 100}
    assert report["targets_by_answer"] == {"(a)": 50, "(b)": 25, "(c)": 25} and collapsed(report)
    assert answered(predictions[:2] + ["(D) red ball", "red ball"], [["(A)", "(B)", "(C)"]] * 4) == [1.0, 1.0, 0.0, 0.0]
    # where the answers are words, a leading letter in brackets is only text
    assert answer_spread(["(A) True", "(A) False"], ["True", "False"])["predictions_by_answer"] == {"(a) true": 1, "(a) false": 1}
