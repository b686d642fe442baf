"""The batched one-copy scorer against a naive two-copy, one-sequence-at-a-time fp32 reference."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from titok.core.excess import response_logprobs, score_pairs
from titok.models import load_model
from titok.core.sequences import collate, encode_pair
from tests.conftest import lm_head_copies

PAIRS = [
    ("What is 2+2?", "2+2 equals 4."),
    ("Name a color.", "Blue."),
    ("Evaluate: not ( True ) and ( True ) is", "False"),
    ("Write one sentence about the sea.", "The sea is vast, deep and full of life; sailors have crossed it for ages."),
    ("Translate 'bonjour' to English.", "Hello — « bonjour » means hello. 😀"),
    ("List three primes.", "2, 3, 5"),
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine river known for art."),
    ("Is righteousness a noun?", "Yes, righteousness is a noun."),
]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smollm2_model):
    """A random, non-trivial LoRA on the real SmolLM2 (B != 0, so expert and amateur differ)."""
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(load_model("smollm2-135m"), config)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def expert(adapter_dir):
    return PeftModel.from_pretrained(load_model("smollm2-135m"), adapter_dir).eval()


@pytest.fixture(scope="module")
def naive_reference(adapter_dir, smollm2_tokenizer):
    """Two separate models, one unpadded sequence at a time."""
    amateur = load_model("smollm2-135m")
    expert = PeftModel.from_pretrained(load_model("smollm2-135m"), adapter_dir).eval()
    results = []
    with torch.no_grad():
        for query, response in PAIRS:
            pair = encode_pair(smollm2_tokenizer, query, response)
            ids = torch.tensor([pair.prompt_ids + pair.response_ids])
            per_model = []
            for model in (expert, amateur):
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
                per_model.append(logprobs[-len(pair.response_ids) :].numpy())
            results.append(per_model)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_naive_two_model_reference(expert, smollm2_tokenizer, naive_reference, batch_size, padding_side):
    queries, responses = zip(*PAIRS)
    scores = score_pairs(expert, smollm2_tokenizer, list(queries), list(responses), batch_size, padding_side)
    for got, (ref_expert, ref_amateur) in zip(scores, naive_reference):
        np.testing.assert_allclose(got.expert_logprobs, ref_expert, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.amateur_logprobs, ref_amateur, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.excess, ref_expert - ref_amateur, atol=1e-4, rtol=0)
    all_excess = np.concatenate([s.excess for s in scores])
    assert np.abs(all_excess).max() > 0.5, "the adapter must actually change the predictions"


@pytest.mark.slow
def test_only_response_tokens_are_scored(expert, smollm2_tokenizer):
    """The scored tokens spell the response and nothing else: their text is the response, their
    spans cover it in order, and in the full chat rendering they sit between the assistant header and the
    end-of-turn token (no template token is scored, none of the response is missed)."""
    queries, responses = zip(*PAIRS)
    scores = score_pairs(expert, smollm2_tokenizer, list(queries), list(responses), batch_size=4)
    end_of_turn = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for query, response, got in zip(queries, responses, scores):
        ids = got.token_ids.tolist()
        assert smollm2_tokenizer.decode(ids) == response
        spans = got.offsets.tolist()
        assert spans == sorted(spans) and all(0 <= a <= b <= len(response) for a, b in spans)
        covered = {i for a, b in spans for i in range(a, b)}  # every visible character (spaces may be trimmed)
        assert all(i in covered for i, ch in enumerate(response) if not ch.isspace())
        chat = smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": query}, {"role": "assistant", "content": response}], tokenize=False)
        full = smollm2_tokenizer(chat, add_special_tokens=False)["input_ids"]
        end = len(full) - 1 - full[::-1].index(end_of_turn)  # the assistant turn's end
        assert full[end - len(ids) : end + 1] == ids + [end_of_turn]
        assert smollm2_tokenizer.decode(full[: end - len(ids)]).endswith("<|im_start|>assistant\n")
        assert len(got.expert_logprobs) == len(got.amateur_logprobs) == len(ids)
        assert (got.expert_logprobs <= 0).all() and (got.amateur_logprobs <= 0).all()


def test_padding_never_leaks_into_scores(smollm2_tokenizer):
    """A tiny model: a short sequence scores the same alone and next to a long one (both paddings)."""
    from tests.conftest import tiny_llama

    base = tiny_llama(smollm2_tokenizer)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    short, long = PAIRS[1], PAIRS[3]
    alone = score_pairs(model, smollm2_tokenizer, [short[0]], [short[1]], batch_size=1)[0]
    for side in ("left", "right"):
        together = score_pairs(model, smollm2_tokenizer, [short[0], long[0]], [short[1], long[1]], 2, side)[0]
        np.testing.assert_allclose(together.excess, alone.excess, atol=1e-5)


def test_expert_must_be_a_peft_model(smollm2_tokenizer):
    from tests.conftest import tiny_llama

    with pytest.raises(TypeError, match="PeftModel"):
        score_pairs(tiny_llama(smollm2_tokenizer), smollm2_tokenizer, ["q"], ["r"])


def test_mismatched_lengths_rejected(smollm2_tokenizer):
    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(smollm2_tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="2 queries but 1 responses"):
        score_pairs(model, smollm2_tokenizer, ["a", "b"], ["c"])


@pytest.mark.slow
def test_expert_logprobs_kept_from_generation_equal_the_two_pass_scorer(adapter_dir):
    """The labels stage keeps each generated token's expert log-prob (raw logits, one step held at a
    time); where the answer re-tokenizes to the same tokens, scoring then runs only the amateur."""
    from titok.engines import GenerationParams, build_engine

    engine = build_engine("transformers", "smollm2-135m", str(adapter_dir), dtype="float32", batch_size=4, max_length=256)
    queries = [q for q, _ in PAIRS]
    labels = engine.label(queries, GenerationParams(max_new_tokens=24, temperature=0.0))
    responses = [label.text for label in labels]
    assert responses == engine.generate(queries, GenerationParams(max_new_tokens=24, temperature=0.0), use_adapter=True)
    kept = [label.expert_logprobs for label in labels]
    canonical = sum(k is not None for k in kept)
    assert canonical >= len(PAIRS) - 2, f"only {canonical} of {len(PAIRS)} answers re-tokenize to their generated tokens"
    from_generation = engine.score(queries, responses, known_expert=kept)
    two_passes = engine.score(queries, responses)
    for got, ref, known in zip(from_generation, two_passes, kept):
        np.testing.assert_allclose(got.expert_logprobs, ref.expert_logprobs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.excess, ref.excess, atol=1e-4, rtol=0)
        if known is not None:
            np.testing.assert_array_equal(got.expert_logprobs, known)  # taken as given, not recomputed
    assert np.abs(np.concatenate([s.excess for s in two_passes])).max() > 0.5


def test_known_expert_logprobs_skip_the_expert_pass(smollm2_tokenizer):
    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(smollm2_tokenizer), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    queries, responses = ["What is 2+2?", "Name a color."], ["2+2 equals 4.", "Blue."]
    full = score_pairs(model, smollm2_tokenizer, queries, responses)
    marked = [np.full(len(full[0].token_ids), -7.0, dtype=np.float32), None]
    mixed = score_pairs(model, smollm2_tokenizer, queries, responses, known_expert=marked)
    np.testing.assert_array_equal(mixed[0].expert_logprobs, marked[0])
    np.testing.assert_allclose(mixed[1].expert_logprobs, full[1].expert_logprobs, atol=1e-6)
    np.testing.assert_allclose(mixed[0].amateur_logprobs, full[0].amateur_logprobs, atol=1e-6)


def test_selective_log_softmax_equals_the_full_one():
    from titok.core.excess import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 1000, dtype=torch.bfloat16) * 5
    targets = torch.randint(0, 1000, (3, 7))
    full = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths,rows,tokens,expected", [
    ([5, 1, 3, 2], 2, None, [[1, 3], [2, 0]]),
    ([10, 10, 10, 40], 4, 30, [[0, 1, 2], [3]]),  # a sequence over the budget goes alone
    ([4, 4, 8, 8], 4, 16, [[0, 1], [2, 3]]),
])
def test_token_budget_batches(lengths, rows, tokens, expected):
    from titok.core.excess import token_budget_batches

    assert token_budget_batches(lengths, rows, tokens) == expected


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
def test_one_mixed_forward_scores_what_two_passes_score(smollm2_tokenizer, side, targets):
    """Amateur and expert rows in one forward (PEFT's per-row adapter) equal the two separate passes,
    also with a LoRA on the LM head (which needs the head's rows, so the head is not narrowed there)."""
    from tests.conftest import tiny_llama

    model = get_peft_model(tiny_llama(smollm2_tokenizer), LoraConfig(r=2, target_modules=targets,
                                                                     init_lora_weights=False)).eval()
    queries, responses = ["What is 2+2?", "Name a color.", "Say hi."], ["2+2 equals 4.", "Blue, or maybe red.", "Hi!"]
    known = [None, np.full(len(encode_pair(smollm2_tokenizer, queries[1], responses[1]).response_ids), -1.0, np.float32), None]
    two = score_pairs(model, smollm2_tokenizer, queries, responses, batch_size=3, padding_side=side, known_expert=list(known))
    one = score_pairs(model, smollm2_tokenizer, queries, responses, batch_size=3, padding_side=side,
                      known_expert=list(known), mixed_batch=True)
    np.testing.assert_array_equal(one[1].expert_logprobs, known[1])  # known: neither path recomputes it
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.expert_logprobs, b.expert_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.amateur_logprobs, b.amateur_logprobs, atol=1e-5, rtol=0)
    assert np.abs(np.concatenate([s.excess for s in two if s is not two[1]])).max() > 1e-3  # the adapter matters


def test_the_frozen_lm_head_is_never_copied_per_row(expert, smollm2_tokenizer):
    """The amateur pass of a left-padded batch keeps logits from mid-sequence on; the frozen head must
    run as one matmul over those positions, not as a batched matmul over B copies of itself."""
    batch = collate([encode_pair(smollm2_tokenizer, q, r) for q, r in PAIRS], smollm2_tokenizer.pad_token_id, "left")
    assert batch.logits_start() > 0
    with expert.disable_adapter():
        assert lm_head_copies(lambda: response_logprobs(expert, batch), len(smollm2_tokenizer)) == []


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_lm_head_runs_only_where_a_response_token_is_predicted(expert, smollm2_tokenizer, side):
    pairs = [encode_pair(smollm2_tokenizer, q, r) for q, r in PAIRS]
    seen = []
    hook = expert.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    try:
        response_logprobs(expert, collate(pairs, smollm2_tokenizer.pad_token_id, side))
    finally:
        hook.remove()
    assert seen == [torch.Size([1, sum(len(p.response_ids) for p in pairs), expert.config.hidden_size])]
