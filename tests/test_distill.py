"""ULD across tokenizers (titok.core.distill): the distance on hand cases, the pairing by character spans,
the training loss with it, and the expert's top-n log-probs from generation."""

import math

import numpy as np
import pytest
import torch

from titok.core.distill import teacher_for_target, uld_distance
from titok.core.excess import top_logprobs
from titok.core.loss import selective_cross_entropy
from titok.core.sequences import build_training_batch
from titok.train.step import attach_fresh_lora, selective_loss
from tests.conftest import tiny_llama

NAN = float("nan")


def test_uld_distance_by_hand():
    """Student probabilities 0.5, 0.25, 0.125, 0.125; the teacher's top 2 are 0.6 and 0.3 (tail 0.1):
    |0.5 - 0.6| + |0.25 - 0.3| + |(1 - 0.75) - 0.1| = 0.1 + 0.05 + 0.15."""
    student = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))  # unsorted: ULD sorts
    teacher = torch.log(torch.tensor([[0.6, 0.3]]))
    torch.testing.assert_close(uld_distance(student, teacher), torch.tensor([0.30]))


def test_uld_ignores_which_tokens_carry_the_mass():
    """Another vocabulary, the same sorted probabilities: distance 0; a flatter student: more."""
    probs = torch.tensor([0.7, 0.2, 0.06, 0.04])
    teacher = torch.log(probs)[None, :3]  # top 3 of 4, tail 0.04
    permuted = torch.log(probs[[2, 0, 3, 1]])[None]
    assert uld_distance(permuted, teacher).item() == pytest.approx(0.0, abs=1e-6)
    wider = torch.log(torch.tensor([[0.7, 0.2, 0.06, 0.02, 0.02]]))  # a 5-token vocabulary, same top 3
    assert uld_distance(wider, teacher).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(1, 4)
    assert uld_distance(flat, teacher).item() == pytest.approx(0.45 + 0.05 + 0.19 + 0.21, abs=1e-6)


def test_top_logprobs_sorted_and_normalized_in_chunks(monkeypatch):
    import titok.core.excess

    logits = torch.randn(7, 50)
    want = torch.log_softmax(logits, dim=-1).sort(dim=-1, descending=True).values[:, :5]
    monkeypatch.setattr(titok.core.excess, "_CHUNK_ELEMENTS", 100)  # two rows per chunk
    torch.testing.assert_close(top_logprobs(logits, 5), want)


def test_the_distance_trains_the_student_towards_the_teacher():
    logits = torch.zeros(3, 10, requires_grad=True)
    teacher = torch.log(torch.tensor([[0.8, 0.1, 0.05]] * 3))
    optimizer = torch.optim.SGD([logits], lr=2.0)
    first = uld_distance(logits, teacher).mean().item()
    for _ in range(50):
        optimizer.zero_grad()
        uld_distance(logits, teacher).mean().backward()
        optimizer.step()
    assert uld_distance(logits, teacher).mean().item() < first / 4


def test_teacher_pairs_each_groups_first_tokens():
    """"Hello world": source ``Hello| world``, target ``Hel|lo| wor|ld``: groups (Hello: Hel lo) and
    ( world: wor ld); the first target token of each gets that group's first source distribution."""
    source = [[0, 5], [6, 11]]  # the space before "world" is left out of its offsets (joins it)
    target = [[0, 3], [3, 5], [5, 9], [9, 11]]
    top = np.array([[-0.1, -2.5], [-0.3, -1.5]], dtype=np.float32)
    out = teacher_for_target(source, top, target, 11)
    np.testing.assert_array_equal(out[0], top[0])
    np.testing.assert_array_equal(out[2], top[1])
    assert np.isnan(out[1]).all() and np.isnan(out[3]).all()
    # two source tokens under one target token: the first source token's distribution
    merged = teacher_for_target([[0, 3], [3, 5]], top, [[0, 5]], 5)
    np.testing.assert_array_equal(merged, top[:1])


QUERIES = ["Evaluate: True and not False", "Sort the words: pear apple fig"]
RESPONSES = ["True, because not False is True.", "apple fig pear"]


def test_loss_adds_the_weighted_uld_of_paired_positions(smollm2_tokenizer):
    """CE plus distill_weight x the mean ULD over the positions with a teacher row, computed here from
    the full logits; a batch without teacher rows, or weight 0, is the plain CE."""
    model = attach_fresh_lora(tiny_llama(smollm2_tokenizer), dropout=0.0).eval()
    lengths = [len(smollm2_tokenizer(r, add_special_tokens=False)["input_ids"]) for r in RESPONSES]
    rng = np.random.default_rng(0)
    teacher = []
    for n in lengths:
        rows = np.sort(np.log(rng.dirichlet(np.ones(6), size=n))[:, :4], axis=1)[:, ::-1].astype(np.float32)
        rows[1::2] = np.nan  # every other token unpaired (not the first of its group)
        teacher.append(rows)
    teacher[1] = None  # a rescored answer: cross-entropy only
    batch = build_training_batch(smollm2_tokenizer, QUERIES, RESPONSES, [[1.0] * n for n in lengths], None, teacher)
    plain = build_training_batch(smollm2_tokenizer, QUERIES, RESPONSES, [[1.0] * n for n in lengths])

    logits = model(**batch.model_inputs()).logits
    ce = selective_cross_entropy(logits, batch.input_ids, batch.token_weights, batch.response_mask)
    predicted = batch.teacher_top[:, 1:]
    paired = ~predicted[..., 0].isnan() & batch.response_mask[:, 1:]
    assert int(paired.sum()) == math.ceil(lengths[0] / 2)  # the first sample's even tokens, nothing else
    uld = uld_distance(logits[:, :-1][paired], predicted[paired]).mean()
    torch.testing.assert_close(selective_loss(model, batch, distill_weight=0.5), ce + 0.5 * uld)
    torch.testing.assert_close(selective_loss(model, batch, distill_weight=0.0), ce)
    torch.testing.assert_close(selective_loss(model, plain, distill_weight=0.5), ce)


def test_teacher_rows_must_match_the_target_tokens(smollm2_tokenizer):
    lengths = [len(smollm2_tokenizer(r, add_special_tokens=False)["input_ids"]) for r in RESPONSES]
    with pytest.raises(ValueError, match="teacher log-probs for 2 tokens"):
        build_training_batch(smollm2_tokenizer, QUERIES, RESPONSES, [[1.0] * n for n in lengths], None,
                             [np.zeros((2, 3)), None])


def test_labels_keep_the_top_n_of_every_generated_token(tmp_path):
    """The transformers engine's top-n at each answer token equal a forward pass over the answer, the
    chosen token's log-prob among them (greedy: the first). Real SmolLM2 with a small random LoRA: a
    tiny random model's answers seldom re-tokenize to their own tokens."""
    from peft import LoraConfig, get_peft_model

    from titok.engines import GenerationParams
    from titok.engines.hf import TransformersEngine
    from titok.models import load_model
    from titok.core.sequences import collate, encode_pair

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    get_peft_model(load_model("smollm2-135m"), lora).save_pretrained(tmp_path / "adapter")
    engine = TransformersEngine("smollm2-135m", str(tmp_path / "adapter"), dtype="float32", batch_size=2)
    labels = engine.label(QUERIES, GenerationParams(max_new_tokens=6), top_logprobs=5)
    checked = 0
    for query, label in zip(QUERIES, labels):
        if label.expert_logprobs is None:
            assert label.top_logprobs is None
            continue
        assert label.top_logprobs.shape == (len(label.expert_logprobs), 5)
        np.testing.assert_allclose(label.top_logprobs[:, 0], label.expert_logprobs, atol=1e-5)
        pair = encode_pair(engine.tokenizer, query, label.text)
        batch = collate([pair], engine.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = engine.model(**batch.model_inputs()).logits[0, len(pair.prompt_ids) - 1 : -1]
        np.testing.assert_allclose(label.top_logprobs, top_logprobs(logits, 5).numpy(), atol=1e-4)
        checked += 1
    assert checked
    assert all(label.top_logprobs is None for label in engine.label(QUERIES, GenerationParams(max_new_tokens=6)))


@pytest.mark.parametrize("mixed_batch", [False, True])
def test_a_rescored_answer_gets_its_top_n_from_the_expert_pass(smollm2_tokenizer, mixed_batch):
    """Where the expert pass runs in scoring (an answer that does not re-tokenize to its generated
    tokens), its top-n come from that pass and equal the expert's own distribution; where the expert
    log-probs were known from generation, scoring leaves the top-n to the labels."""
    from peft import LoraConfig, get_peft_model

    from titok.core.excess import score_pairs
    from titok.core.sequences import collate, encode_pair

    torch.manual_seed(0)
    expert = get_peft_model(tiny_llama(smollm2_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False)).eval()
    known = [None, np.zeros(len(smollm2_tokenizer(RESPONSES[1], add_special_tokens=False)["input_ids"]), dtype=np.float32)]
    scored = score_pairs(expert, smollm2_tokenizer, QUERIES, RESPONSES, known_expert=known, mixed_batch=mixed_batch, top_n=3)
    assert scored[1].expert_top is None
    pair = encode_pair(smollm2_tokenizer, QUERIES[0], RESPONSES[0])
    with torch.no_grad():
        logits = expert(**collate([pair], smollm2_tokenizer.pad_token_id).model_inputs()).logits[0, len(pair.prompt_ids) - 1 : -1]
    np.testing.assert_allclose(scored[0].expert_top, top_logprobs(logits, 3).numpy(), atol=1e-5)
    np.testing.assert_allclose(scored[0].expert_top.max(axis=1) >= scored[0].expert_logprobs - 1e-5, True)
