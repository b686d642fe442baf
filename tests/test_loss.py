import pytest
import torch
from peft import PeftModel

from titok.core.loss import selective_cross_entropy
from titok.core.sequences import build_training_batch
from titok.train.step import TorchEngine, attach_fresh_lora, selective_loss, training_step
from tests.conftest import lm_head_copies, tiny_gemma3, tiny_llama

QUERIES = ["Evaluate: True and not False", "Sort the words: pear apple fig"]
RESPONSES = ["True, because not False is True.", "apple fig pear"]


def _batch(tokenizer, weights_fn):
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in RESPONSES]
    return build_training_batch(tokenizer, QUERIES, RESPONSES, [weights_fn(n) for n in lengths])


def test_hand_computed_normalizations():
    """Each predicted token has its own CE (a different logit for it, 0 for the two others), so a
    wrong weight, a token counted twice or a wrong denominator changes the value."""
    import math

    input_ids = torch.tensor([[0, 1, 2, 0]])  # position t predicts input_ids[t + 1]
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1], logits[0, 1, 2], logits[0, 2, 0] = 2.0, 0.0, -1.0
    ce = [math.log(math.exp(v) + 2) - v for v in (2.0, 0.0, -1.0)]  # -log softmax of the target
    response = torch.tensor([[False, True, True, True]])
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.5]])  # the first is a prompt position: never counts
    mean = selective_cross_entropy(logits, input_ids, weights, response, "selected_mean")
    torch.testing.assert_close(mean, torch.tensor((1.0 * ce[0] + 0.5 * ce[2]) / 1.5))
    rho1 = selective_cross_entropy(logits, input_ids, weights, response, "rho1", k=0.5)
    torch.testing.assert_close(rho1, torch.tensor((1.0 * ce[0] + 0.5 * ce[2]) / (0.5 * 3)))
    with pytest.raises(ValueError, match="rho1 normalization needs k"):
        selective_cross_entropy(logits, input_ids, weights, response, "rho1")
    with pytest.raises(ValueError, match="normalization must be"):
        selective_cross_entropy(logits, input_ids, weights, response, "sum")


def test_prompt_positions_never_count_even_with_weight():
    logits = torch.randn(1, 4, 5)
    input_ids = torch.tensor([[0, 1, 2, 3]])
    response = torch.tensor([[False, False, True, True]])
    base = selective_cross_entropy(logits, input_ids, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), response)
    leaky = selective_cross_entropy(logits, input_ids, torch.tensor([[1.0, 1.0, 1.0, 1.0]]), response)
    torch.testing.assert_close(base, leaky)


def test_unselected_tokens_get_no_gradient(smollm2_tokenizer):
    """Labels changed at unselected positions leave loss and every LoRA gradient unchanged."""
    model = attach_fresh_lora(tiny_llama(smollm2_tokenizer), rank=4, dropout=0.0)
    for name, param in model.named_parameters():  # non-zero B, so A's gradient is non-zero too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    batch = _batch(smollm2_tokenizer, lambda n: [float(i % 2) for i in range(n)])

    def loss_and_grads(input_ids, labels_only_at):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
        logits.retain_grad()
        # the model sees the original inputs; only the targets at unselected positions change
        loss = selective_cross_entropy(logits, labels_only_at, batch.token_weights, batch.response_mask)
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, logits.grad

    loss_a, grads_a, logit_grad = loss_and_grads(batch.input_ids, batch.input_ids)
    changed = batch.input_ids.clone()
    unselected = batch.response_mask & (batch.token_weights == 0)
    assert unselected.any()
    changed[unselected] = (changed[unselected] + 7) % len(smollm2_tokenizer)
    loss_b, grads_b, _ = loss_and_grads(batch.input_ids, changed)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    # logits at position t predict token t+1: their gradient is zero wherever token t+1 is unselected
    predicts_unselected = torch.zeros_like(unselected)
    predicts_unselected[:, :-1] = unselected[:, 1:] | ~batch.response_mask[:, 1:]
    assert logit_grad[predicts_unselected].abs().max() == 0
    assert logit_grad[~predicts_unselected].abs().sum() > 0


@pytest.mark.parametrize("tokenizer_name,make_model", [("smollm2_tokenizer", tiny_llama), ("gemma3_tokenizer", tiny_gemma3)])
def test_loss_decreases_on_a_tiny_model(request, tokenizer_name, make_model):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = attach_fresh_lora(make_model(tokenizer), rank=8, alpha=16, dropout=0.0)
    assert isinstance(model, PeftModel)
    batch = _batch(tokenizer, lambda n: [1.0 if i % 3 else 0.5 for i in range(n)])
    engine = TorchEngine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), max_grad_norm=1.0)
    first = selective_loss(model, batch).item()
    for _ in range(30):
        training_step(engine, batch)
    model.eval()
    last = selective_loss(model, batch).item()
    assert last < first - 0.5, (first, last)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_weights_must_cover_the_target_tokens(smollm2_tokenizer):
    with pytest.raises(ValueError, match="aligned to the target tokenizer"):
        build_training_batch(smollm2_tokenizer, QUERIES, RESPONSES, [[1.0], [1.0]])


def test_selective_loss_skips_prompt_logits_without_changing_the_loss(smollm2_tokenizer):
    model = attach_fresh_lora(tiny_llama(smollm2_tokenizer), dropout=0.0).eval()
    batch = _batch(smollm2_tokenizer, lambda n: [1.0 if i % 2 else 0.25 for i in range(n)])
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    full = selective_cross_entropy(logits, batch.input_ids, batch.token_weights, batch.response_mask)
    torch.testing.assert_close(selective_loss(model, batch), full)
    rho1 = selective_cross_entropy(logits, batch.input_ids, batch.token_weights, batch.response_mask, "rho1", 0.7)
    torch.testing.assert_close(selective_loss(model, batch, "rho1", 0.7), rho1)


@pytest.mark.parametrize("normalization,k", [("selected_mean", None), ("rho1", 0.7)])
def test_the_head_runs_only_on_weighted_predictions_with_the_same_loss_and_gradients(gemma3_tokenizer, normalization, k):
    model = attach_fresh_lora(tiny_gemma3(gemma3_tokenizer), dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"))
    for name, param in model.named_parameters():  # a non-zero LoRA, so the gradients reach every factor
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    batch = _batch(gemma3_tokenizer, lambda n: [0.0 if i % 3 == 0 else 0.5 + (i % 2) / 2 for i in range(n)])
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lora]

    full_logits = lambda: selective_cross_entropy(model(**batch.model_inputs()).logits, batch.input_ids,  # noqa: E731
                                                  batch.token_weights, batch.response_mask, normalization, k)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:2]))
    narrowed = loss_and_grads(lambda: selective_loss(model, batch, normalization, k))
    hook.remove()
    assert seen == [torch.Size([1, int((batch.token_weights * batch.response_mask)[:, 1:].gt(0).sum())])]
    reference = loss_and_grads(full_logits)
    torch.testing.assert_close(narrowed[0], reference[0])
    for got, want in zip(narrowed[1], reference[1]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_the_frozen_lm_head_is_never_copied_per_row(gemma3_tokenizer):
    """Response logits start mid-sequence; the frozen head must still run as one matmul, forward and
    backward (a strided slice made torch expand it per row: Gemma-3-270M steps 4x slower)."""
    model = attach_fresh_lora(tiny_gemma3(gemma3_tokenizer), dropout=0.0)
    batch = _batch(gemma3_tokenizer, lambda n: [1.0] * n)
    assert batch.logits_start() > 0 and batch.input_ids.shape[0] > 1  # the case that was slow
    assert lm_head_copies(lambda: selective_loss(model, batch).backward(), len(gemma3_tokenizer)) == []


def test_end_of_turn_token_is_always_trained(smollm2_tokenizer):
    batch = _batch(smollm2_tokenizer, lambda n: [0.0] * n)
    for row in range(batch.input_ids.shape[0]):
        positions = batch.response_mask[row].nonzero().flatten()
        last = positions[-1]
        assert batch.input_ids[row, last] == smollm2_tokenizer.eos_token_id
        assert batch.token_weights[row, last] == 1.0 and batch.token_weights[row, positions[:-1]].sum() == 0
