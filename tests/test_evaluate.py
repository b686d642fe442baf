import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from titok.evaluate import answer_budget, evaluate, evaluate_variants
from titok.tasks import load_task


@pytest.mark.slow
def test_eval_stage_on_a_tiny_model(tiny_model_dirs, local_ray):
    report = evaluate(tiny_model_dirs["source"], tiny_model_dirs["adapter"], "boolean_expressions", n_test=6,
                      dtype="float32", max_new_tokens=8, batch_size=4)
    assert report["n"] == 6
    assert 0.0 <= report["exact_match"] <= 1.0 and 0.5 <= report["majority_rate"] <= 1.0
    assert 0.0 <= report["option_accuracy"] <= 1.0  # True/False is a closed answer set
    assert len(report["examples"]) == 5 and all(isinstance(e["prediction"], str) for e in report["examples"])
    vanilla = evaluate(tiny_model_dirs["source"], None, "boolean_expressions", n_test=6, dtype="float32",
                       max_new_tokens=8, batch_size=4)
    assert [e["prediction"] for e in vanilla["examples"]] != [e["prediction"] for e in report["examples"]]


@pytest.mark.slow
def test_variants_in_one_pass_equal_separate_evaluations(tiny_model_dirs, local_ray, tmp_path):
    """One actor switching adapters on one base copy must give what one engine per adapter gives."""
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["source"])
    other = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    variants = {"vanilla": None, "first": tiny_model_dirs["adapter"], "second": str(tmp_path / "other")}
    kwargs = {"n_test": 6, "dtype": "float32", "max_new_tokens": 8, "batch_size": 4}
    together = evaluate_variants(tiny_model_dirs["source"], variants, "boolean_expressions", **kwargs)
    predictions = {name: [e["prediction"] for e in report["examples"]] for name, report in together.items()}
    assert len({tuple(p) for p in predictions.values()}) == 3  # three different models
    for name, adapter in variants.items():
        alone = evaluate(tiny_model_dirs["source"], adapter, "boolean_expressions", **kwargs)
        assert [e["prediction"] for e in alone["examples"]] == predictions[name]
        assert (alone["exact_match"], alone["option_accuracy"]) == \
            (together[name]["exact_match"], together[name]["option_accuracy"])


def test_answer_budget_covers_the_longest_reference_answer():
    examples = load_task("boolean_expressions", n_test=20).test_examples
    budget = answer_budget("smollm2-135m", examples)
    from titok.models import load_tokenizer
    from titok.tasks import reference_response

    tokenizer = load_tokenizer("smollm2-135m")
    longest = max(len(tokenizer(reference_response(e), add_special_tokens=False)["input_ids"]) for e in examples)
    assert budget == int(1.25 * longest) + 8 and budget > longest
