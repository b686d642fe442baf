"""The validation split of the synthetic samples and the learning-rate rule (pure), and the held-out
loss the trainer measures, against the same loss computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titok.config import TrainConfig
from titok.core.sequences import build_training_batch
from titok.core.validation_split import (answer_budget, answer_counts, answer_ends, answers_spread, best_lr,
                                         collapsed_answer_text, ruled_out, validation_count, validation_mask)
from titok.train.step import TorchEngine, attach_fresh_lora, held_out_answers, validation_loss
from titok.models import stop_token_ids
from tests.conftest import real_tokenizer, tiny_llama


@pytest.mark.parametrize("rows,fraction,held_out", [(250, 0.1, 25), (12, 0.25, 3), (5, 0.01, 1), (2, 0.5, 1),
                                                     (1, 0.5, 0), (100, 0.0, 0)])
def test_the_held_out_count_is_the_fraction_at_least_one_never_all(rows, fraction, held_out):
    assert validation_count(rows, fraction) == held_out
    assert validation_mask(rows, fraction, seed=0).sum() == held_out


def test_the_held_out_rows_are_a_seeded_draw():
    first = validation_mask(250, 0.1, seed=0)
    assert (first == validation_mask(250, 0.1, seed=0)).all()  # every worker and a resumed run agree
    assert not (first == validation_mask(250, 0.1, seed=1)).all()
    assert np.flatnonzero(first).max() > 125  # drawn from the whole pool, not its head


def test_the_lowest_final_validation_loss_wins_and_a_diverged_rate_cannot():
    assert best_lr({3e-4: [2.0, 1.5], 1e-3: [1.8, 1.2], 3e-3: [1.1, 1.3]}) == 1e-3  # the last epoch counts
    assert best_lr({1e-3: [1.0], 3e-4: [1.0]}) == 3e-4  # a tie: the smaller rate
    assert best_lr({1e-3: [1.4], 1e30: [], 3e-3: [1.0, math.nan]}) == 1e-3
    with pytest.raises(ValueError, match="no learning rate"):
        best_lr({1e30: [], 3e-3: [math.inf]})


def test_a_rate_whose_held_out_answers_do_not_end_cannot_win_however_low_its_loss():
    """uld on boolean_expressions (Gemma-3-270M, seed 0): 1e-2 had the lowest validation loss, by 0.003,
    and ended 5 of its 32 held-out answers (3e-3: 32, 1e-3: 20); on the test split it answered 107 of
    200 questions and scored 0.34 against 3e-3's 0.685."""
    curves = {1e-3: [0.313], 3e-3: [0.277], 1e-2: [0.275]}
    assert best_lr(curves) == 1e-2
    assert best_lr(curves, {1e-3: 20 / 32, 3e-3: 32 / 32, 1e-2: 5 / 32}) == 3e-3
    assert ruled_out({1e-3: 20 / 32, 3e-3: 1.0, 1e-2: 5 / 32}) == {1e-3, 1e-2}
    assert ruled_out({1e-3: 0.9, 3e-3: 1.0}) == set()  # 10 points fewer is within the tolerance ...
    assert ruled_out({1e-3: 28 / 32, 3e-3: 1.0}) == {1e-3}  # ... 12.5 is not
    assert best_lr(curves, {1e-3: None, 3e-3: 0.5, 1e-2: None}) == 1e-2  # not checked: rules nothing out
    # the best share counts among the rates that finished: a diverged rate's cannot rule another out
    assert best_lr({1e-3: [0.3], 1e30: [math.nan]}, {1e-3: 0.2, 1e30: 1.0}) == 1e-3


def test_held_out_answers_are_counted_by_the_experts_answers_to_the_same_queries():
    """Keys as every metric reads an answer (after "the answer is", by option letter where the expert
    answers with letters); an answer the expert never gives, or none, counts apart; one rank's share
    of the queries counts by the keys of all of them, so the ranks' counts add up."""
    expert = ["Sam lies. So the answer is No.", "So the answer is Yes.", "So the answer is yes", "the answer is No"]
    keys, counts, expert_counts = answer_counts(
        ["So the answer is Yes.", "yes", "So the answer is maybe", "Sam tells the truth. Sam lies. Sam"], expert)
    assert (keys, counts, expert_counts) == (["no", "yes"], [0, 2, 2], [2, 2, 0])
    assert answer_counts(["So the answer is No."], expert) == (["no", "yes"], [1, 0, 0], [2, 2, 0])  # one rank's share
    lettered = ["The answer is (B).", "The answer is (A)", "So the answer is (C)."]
    assert answer_counts(["So the answer is (B) red ball.", "(b)", "(D)"], lettered) == (
        ["(a)", "(b)", "(c)"], [0, 2, 0, 1], [1, 1, 1, 0])


def test_a_rate_whose_held_out_answers_collapse_cannot_win_over_one_whose_do_not():
    """uld on web_of_lies (Gemma-3-270M, seed 0) kept 3e-3 by the lowest validation loss and said "yes"
    to 90% of the test questions. A rate that gives one answer to >= 90% of the held-out queries, where
    the expert's answers to them are more varied, is ruled out while another rate's answers are not;
    where every rate collapses, or the expert itself answers one thing, the loss decides."""
    spread = answers_spread(["no", "yes"], [1, 29, 2], [14, 18, 0])
    assert spread == {"top": "yes", "share": 29 / 32, "expert_share": 18 / 32, "collapsed": True}
    assert collapsed_answer_text(spread) == "'yes' to 91%: collapsed"
    assert not answers_spread(["no", "yes"], [3, 28, 1], [14, 18, 0])["collapsed"]  # 28 of 32: 87.5%
    assert not answers_spread(["no", "yes"], [0, 32, 0], [2, 30, 0])["collapsed"]  # the expert's own 94%
    assert answers_spread(["no", "yes"], [0, 3, 29], [16, 16, 0])["share"] == 3 / 32  # the rest is no answer

    curves = {1e-3: [0.319], 3e-3: [0.293], 1e-2: [0.320]}
    ends = {1e-3: 26 / 32, 3e-3: 29 / 32, 1e-2: 27 / 32}
    one, varied = spread, {**spread, "top": "no", "share": 0.5, "collapsed": False}
    assert best_lr(curves, ends) == 3e-3
    assert best_lr(curves, ends, {1e-3: varied, 3e-3: one, 1e-2: one}) == 1e-3
    assert ruled_out(ends, {1e-3: varied, 3e-3: one, 1e-2: one}) == {3e-3, 1e-2}
    assert best_lr(curves, ends, {1e-3: one, 3e-3: one, 1e-2: one}) == 3e-3  # every rate collapsed
    assert best_lr(curves, ends, {1e-3: None, 3e-3: one, 1e-2: None}) == 3e-3  # not counted: no evidence
    # the answers that end are read first: a rate whose answers loop does not stay in as the one that does not collapse
    assert ruled_out({1e-3: 5 / 32, 3e-3: 1.0}, {1e-3: varied, 3e-3: one}) == {1e-3}
    # and a diverged rate's spread counts for nothing
    assert best_lr({1e-3: [0.3], 1e30: [math.nan]}, {1e-3: 1.0, 1e30: 1.0}, {1e-3: one, 1e30: varied}) == 1e-3


def test_zero3_gathers_the_whole_base_for_the_answers_only_where_half_the_free_memory_holds_it():
    from titok.core.validation_split import gathers_base_once

    gib = 1 << 30
    assert gathers_base_once(16 * gib, 60 * gib)  # an 8B target in bf16 beside ZeRO-3 training on an 80 GB GPU
    assert gathers_base_once(30 * gib, 60 * gib) and not gathers_base_once(30 * gib + 1, 60 * gib)
    assert not gathers_base_once(141 * gib, 75 * gib)  # 70B in bf16 on 80 GB: every decode step gathers it
    assert not gathers_base_once(1, None)  # free memory unknown (titok plan without a GPU size): per step


def test_an_answer_ends_when_its_turn_closes_within_twice_the_experts_length_and_16():
    assert answer_budget(0) == 16 and answer_budget(30) == 76
    stop = [1, 106]  # Gemma's <eos> and <end_of_turn>: either ends an answer
    assert answer_ends([5] * 75 + [106], stop, response_tokens=30)  # the 76th new token: within
    assert answer_ends([5] * 75 + [1], stop, response_tokens=30)
    assert not answer_ends([5] * 76 + [106], stop, response_tokens=30)  # the 77th: a loop that ran on
    assert not answer_ends([5] * 200, stop, response_tokens=30)


@pytest.mark.parametrize("eos_at,ends", [(0, True), (15, True), (16, False), (None, False)])
def test_held_out_answers_are_generated_and_checked_against_the_budget(eos_at, ends):
    """A tiny model made to close its turn at new token ``eos_at`` (a hook on the LM head, counting the
    generation's forward passes): with the expert's response 0 tokens long the budget is 16 new tokens,
    so the 16th token (index 15) ends in time and the 17th does not, for every query of a left-padded batch."""
    tokenizer = real_tokenizer("smollm2-135m")
    model = attach_fresh_lora(tiny_llama(tokenizer), rank=4)
    calls, stop = [], stop_token_ids(model, tokenizer)

    def close_turn_at(module, inputs, logits):
        calls.append(1)  # one call per generated token: the prompt's pass makes the first
        boost = torch.zeros(logits.shape[-1])
        boost[stop] = -1e4  # no stop token (end of turn, the config's end token, padding) before eos_at
        if len(calls) - 1 == eos_at:
            boost[tokenizer.eos_token_id] = 1e4
        return logits + boost

    model.get_output_embeddings().register_forward_hook(close_turn_at)
    queries = ["True and False is", "not ( True ) or ( False and True ) and not False is", "False is"]
    answers = held_out_answers(TorchEngine(model, None), tokenizer, queries, [0, 0, 0], batch_size=3)
    assert [ended for ended, _ in answers] == [ends] * 3
    # the text is the answer up to its stop token: none at once, else what came before it
    assert all((text == "") == (eos_at == 0) for _, text in answers)
    assert not model.training


def test_a_search_needs_held_out_samples_and_distinct_positive_rates():
    with pytest.raises(ValueError, match="lr_search needs validation_fraction"):
        TrainConfig.model_validate({"lr_search": [1e-4, 1e-3]})
    with pytest.raises(ValueError, match="listed once"):
        TrainConfig.model_validate({"lr_search": [1e-3, 1e-3], "validation_fraction": 0.1})
    assert TrainConfig.model_validate({"lr_search": [1e-4, 1e-3], "validation_fraction": 0.1}).lr_search == [1e-4, 1e-3]


def test_the_validation_loss_is_the_token_weighted_mean_over_the_kept_tokens_without_dropout():
    tokenizer = real_tokenizer("smollm2-135m")
    model = attach_fresh_lora(tiny_llama(tokenizer), rank=4, dropout=0.5)
    with torch.no_grad():  # a LoRA that has trained: a fresh one (B = 0) hides its dropout
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
    queries = ["True and False is", "not ( True ) or False is", "False or False is"]
    responses = ["False. So the answer is False.", "The answer is False.", "So the answer is False."]
    weights = [np.array([1.0, 0.0, 0.5] + [1.0] * 20)[: len(tokenizer(r, add_special_tokens=False).input_ids)]
               for r in responses]
    batches = [build_training_batch(tokenizer, queries[:2], responses[:2], weights[:2]),
               build_training_batch(tokenizer, queries[2:], responses[2:], weights[2:])]

    total, kept = 0.0, 0.0
    with torch.no_grad():
        model.eval()
        for batch in batches:  # by hand: every kept prediction once, weighted, over all batches
            logits = model(**batch.model_inputs()).logits
            w = (batch.token_weights * batch.response_mask)[:, 1:].float()
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.input_ids[:, 1:].flatten(), reduction="none")
            total += float((ce.view_as(w) * w).sum())
            kept += float(w.sum())
    model.train()  # dropout on: validation_loss must turn it off itself
    measured = validation_loss(engine, batches)
    assert measured == pytest.approx(total / kept, rel=1e-5)
    assert validation_loss(engine, batches) == measured  # no dropout: the same number twice


def test_only_a_diverged_rate_loses_a_search_a_crashed_one_fails_the_job(tmp_path):
    """A rate whose training diverged (non-finite loss) cannot win; one whose workers died (a lost
    node, a crashed controller) never finished, so the job fails rather than crown another rate."""
    from titok.train.job import TrainingJob
    from titok.train.ray_train import TrainOutcome, _chosen

    train = TrainConfig.model_validate({"validation_fraction": 0.1, "lr_search": [1e-4, 1e-3, 1e30]})
    job = TrainingJob.of(train, "tiny", seed=0, run_dir=str(tmp_path), max_length=64, k=0.7)
    done = {"default@lr0.0001": TrainOutcome("a", tmp_path, {"lr": 1e-4}, val_losses=[2.0, 1.5]),
            "default@lr0.001": TrainOutcome("b", tmp_path, {"lr": 1e-3}, val_losses=[1.8, 1.2]),
            "default@lr1e+30": TrainOutcome("c", error=FloatingPointError("step 0: non-finite training loss"))}
    won = _chosen("default", job, done)
    assert won.error is None and won.metrics["lr"] == 1e-3 and won.lr_search[1e30] == []
    # the lower loss, but its held-out answers end on 3 of 25 queries where 1e-4's end on all of them
    looping = dict(done, **{"default@lr0.0001": TrainOutcome("a", tmp_path, {"lr": 1e-4, "val_answers_end": 1.0},
                                                              val_losses=[2.0, 1.5]),
                            "default@lr0.001": TrainOutcome("b", tmp_path, {"lr": 1e-3, "val_answers_end": 0.12},
                                                             val_losses=[1.8, 1.2])})
    kept = _chosen("default", job, looping)
    assert kept.metrics["lr"] == 1e-4 and kept.answers_end == {1e-4: 1.0, 1e-3: 0.12, 1e30: None}
    # the lower loss, but "yes" to 30 of its 32 held-out answers, where the expert's split 18 / 14
    def checked(top, share):
        return {"val_answers_end": 1.0, "val_answers_top": top, "val_answers_top_share": share,
                "val_expert_top_share": 18 / 32, "val_answers_collapsed": share >= 0.9}
    one_answer = dict(done, **{"default@lr0.0001": TrainOutcome("a", tmp_path, {"lr": 1e-4, **checked("no", 0.6)},
                                                                 val_losses=[2.0, 1.5]),
                               "default@lr0.001": TrainOutcome("b", tmp_path, {"lr": 1e-3, **checked("yes", 30 / 32)},
                                                                val_losses=[1.8, 1.2])})
    kept = _chosen("default", job, one_answer)
    assert kept.metrics["lr"] == 1e-4 and kept.answers_spread[1e30] is None
    assert kept.answers_spread[1e-3] == {"top": "yes", "share": 30 / 32, "expert_share": 18 / 32, "collapsed": True}
    lost = dict(done, **{"default@lr0.001": TrainOutcome("b", error=RuntimeError("the train controller died"))})
    failed = _chosen("default", job, lost)
    assert isinstance(failed.error, RuntimeError) and "controller died" in str(failed.error)


def test_the_summary_line_and_the_report_name_a_rate_whose_answers_collapsed():
    """What the run's summary line and compare's learning-rate table say of a search in which 3e-3 had
    the lowest loss but answered "yes" to 30 of 32 held-out queries."""
    from titok.workflows.pipeline import format_summary
    from titok.workflows.report import _learning_rates_text

    collapsed = {"top": "yes", "share": 30 / 32, "expert_share": 18 / 32, "collapsed": True}
    train = {"metrics": {"lr": 1e-3}, "lr_search": {"0.001": [0.319], "0.003": [0.293]},
             "lr_answers_end": {"0.001": 26 / 32, "0.003": 29 / 32}, "lr_ruled_out": ["0.003"],
             "lr_answers_spread": {"0.001": {**collapsed, "top": "no", "share": 0.5, "collapsed": False},
                                   "0.003": collapsed}}
    line = format_summary({"stages": {}, "train": train, "run_dir": "runs/x"})
    assert "train lr: 0.001, the lowest validation loss of 0.001: 0.3190 (answers end 81%), " \
           "0.003: 0.2930 (answers end 91%, 'yes' to 94%: collapsed: ruled out)" in line
    table = _learning_rates_text({("web_of_lies", "gemma3-270m", "uld", 0): train})
    assert "| web_of_lies | gemma3-270m | uld | 0 | **0.319, ends 81%** | ~~0.293, ends 91%, 'yes' to 94%: collapsed~~ |" in table
