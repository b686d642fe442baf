import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from titok.workflows.evaluate import answer_budget, evaluate, evaluate_variants
from titok.tasks import load_task


def _option_choices_by_hand(base: str, adapter: str, examples: list[dict], options: list[str]) -> list[tuple[int, float]]:
    """(best option, margin over the runner-up) per example: one unpadded forward per option, the
    mean log-prob of the option's tokens after the chat prompt."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    out = []
    for example in examples:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": example["input"]}], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        means = []
        for option in options:
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + option_ids])
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
            picked = logprobs[torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1), ids[0, len(prompt_ids):]]
            means.append(float(picked.mean()))
        ranked = sorted(means, reverse=True)
        out.append((means.index(ranked[0]), ranked[0] - ranked[1]))
    return out


@pytest.mark.slow
def test_eval_stage_on_a_tiny_model(tiny_model_dirs, local_ray):
    """Every number in the report is checked against a computation made here without titok: the
    majority rate from the targets, the option choices from unpadded forwards, exact match from the
    predictions it reports."""
    from collections import Counter

    from titok.core.metrics import extract_answer

    report = evaluate(tiny_model_dirs["source"], tiny_model_dirs["adapter"], "boolean_expressions", n_test=6,
                      dtype="float32", max_new_tokens=8, batch_size=4)
    task = load_task("boolean_expressions", n_test=6)
    targets = [e["target"] for e in task.test_examples]
    assert report["n"] == 6 and report["majority_rate"] == Counter(targets).most_common(1)[0][1] / 6

    hand = _option_choices_by_hand(tiny_model_dirs["source"], tiny_model_dirs["adapter"], task.test_examples,
                                   task.answer_set)
    assert len(report["per_example"]["option_accuracy"]) == 6
    for (choice, margin), correct, target in zip(hand, report["per_example"]["option_accuracy"], targets):
        if margin > 1e-4:  # padding moves a near-tie by ~1e-6; anything clearer must agree
            assert correct == float(task.answer_set[choice] == target)
    assert report["option_accuracy"] == pytest.approx(sum(report["per_example"]["option_accuracy"]) / 6)

    shown = report["examples"]
    assert [e["target"] for e in shown] == targets[:5]
    assert [e["extracted"] for e in shown] == [extract_answer(e["prediction"]) for e in shown]
    assert report["per_example"]["exact_match"][:5] == [float(extract_answer(e["prediction"]) == e["target"]) for e in shown]
    assert report["exact_match"] == pytest.approx(sum(report["per_example"]["exact_match"]) / 6)
    assert report["predictions"][:5] == [e["prediction"] for e in shown] and len(report["predictions"]) == 6
    in_set = [extract_answer(p).strip().lower() in {"true", "false"} for p in report["predictions"]]
    assert report["answered_share"] == pytest.approx(sum(in_set) / 6)
    vanilla = evaluate(tiny_model_dirs["source"], None, "boolean_expressions", n_test=6, dtype="float32",
                       max_new_tokens=8, batch_size=4)
    assert [e["prediction"] for e in vanilla["examples"]] != [e["prediction"] for e in shown]


@pytest.mark.slow
def test_variants_in_one_pass_equal_separate_evaluations_and_the_cache_evaluates_only_new_ones(tiny_model_dirs, local_ray,
                                                                                               tmp_path, monkeypatch):
    """One actor switching adapters on one base copy gives what one evaluation per adapter gives. Those
    come from the cache as a compare given one more method (a zoo one more adapter) makes them: each
    call evaluates only the variant the file lacks (the others come back as they were: a value planted
    in the file shows it), and a retrained adapter (new weights) is evaluated again, nothing else.
    Weights are evaluated once: a variant whose adapter another has (kd's row under both budgets)
    takes that one's report, kept or made in the same pass."""
    from titok.workflows import evaluate as evaluate_module
    import json
    import shutil

    from titok.config import EvalSettings
    from titok.workflows.evaluate import cached_evaluation

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["source"])
    other = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    other.save_pretrained(tmp_path / "other")
    shutil.copytree(tiny_model_dirs["adapter"], tmp_path / "first")
    variants = {"vanilla": None, "first": str(tmp_path / "first"), "second": str(tmp_path / "other")}
    settings = EvalSettings(examples=6, batch_size=4, dtype="float32", max_new_tokens=8)
    together = evaluate_variants(tiny_model_dirs["source"], variants, "boolean_expressions", n_test=settings.examples,
                                 dtype=settings.dtype, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)
    predictions = {name: [e["prediction"] for e in report["examples"]] for name, report in together.items()}
    assert len({tuple(p) for p in predictions.values()}) == 3  # three different models

    path = tmp_path / "evals" / "seed0.json"

    def cached(names):
        return cached_evaluation(settings, 0, path, tiny_model_dirs["source"], {n: variants[n] for n in names},
                                 "boolean_expressions")

    def plant():  # a mark no evaluation writes: a report that has it was read back from the file
        if path.is_file():
            known = json.loads(path.read_text())
            for report in known["reports"].values():
                report["planted"] = True
            path.write_text(json.dumps(known))

    alone = {}
    for added in variants:  # one more variant per call, as methods are added to a compare
        plant()
        reports = cached([*alone, added])
        assert list(reports) == [*alone, added]
        assert all(reports[name].get("planted") for name in alone) and "planted" not in reports[added]
        alone[added] = reports[added]
    for name, report in alone.items():
        assert [e["prediction"] for e in report["examples"]] == predictions[name]
        assert (report["exact_match"], report["option_accuracy"]) == \
            (together[name]["exact_match"], together[name]["option_accuracy"])

    passes = []  # the variants each evaluation pass generates for (the real evaluation, watched)
    real_pass = evaluate_module.evaluate_variants
    monkeypatch.setattr(evaluate_module, "evaluate_variants",
                        lambda base, todo, *args, **kw: passes.append(sorted(todo)) or real_pass(base, todo, *args, **kw))

    def new_weights(folder, seed):
        torch.manual_seed(seed)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["source"]),
                       LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj"], init_lora_weights=False)).save_pretrained(folder)

    new_weights(tmp_path / "first", 2)  # retrained
    plant()
    again = cached(["first", "second"])
    assert passes == [["first"]] and "planted" not in again["first"] and again["second"]["planted"]
    retrained = [e["prediction"] for e in again["first"]["examples"]]
    assert retrained != predictions["first"]
    # settings put back: the first weights again, whose report the file kept when they were replaced
    shutil.rmtree(tmp_path / "first")
    shutil.copytree(tiny_model_dirs["adapter"], tmp_path / "first")
    back = cached(["first"])
    assert passes == [["first"]] and back["first"]["planted"]
    assert [e["prediction"] for e in back["first"]["examples"]] == predictions["first"]
    new_weights(tmp_path / "first", 2)  # and retrained once more: that report too came back from the file
    assert [e["prediction"] for e in cached(["first"])["first"]["examples"]] == retrained and passes == [["first"]]

    # twins: "kept" has the second's weights (in the file), "a" and "b" weights new to it
    shutil.copytree(tmp_path / "other", tmp_path / "kept")
    new_weights(tmp_path / "a", 3)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    plant()
    twins = cached_evaluation(settings, 0, path, tiny_model_dirs["source"],
                              {n: str(tmp_path / n) for n in ("kept", "a", "b")}, "boolean_expressions")
    assert passes == [["first"], ["a"]]  # "b" came from "a"'s pass, "kept" from the file, and "first" was not run again
    assert twins["kept"]["planted"] and [e["prediction"] for e in twins["kept"]["examples"]] == predictions["second"]
    assert [e["prediction"] for e in twins["b"]["examples"]] == [e["prediction"] for e in twins["a"]["examples"]]
    assert {n: twins[n]["adapter"] for n in twins} == {n: str(tmp_path / n) for n in twins}  # each its own folder
    assert set(json.loads(path.read_text())["reports"]) == {*variants, "kept", "a", "b"}  # none dropped for later calls

    known = json.loads(path.read_text())  # what older code read off the predictions: read again, not kept
    known["reports"]["second"].update(exact_match=-1.0, top_prediction="stale", answered_share=-1.0)
    path.write_text(json.dumps(known))
    reread = cached(["second"])["second"]
    fields = ("exact_match", "top_prediction", "top_prediction_share", "answered_share")
    assert reread["planted"] and [reread[f] for f in fields] == [together["second"][f] for f in fields]


def test_answer_budget_covers_the_longest_reference_answer():
    """Every reference answer fits with room to spare (a right answer is never cut), the budget
    follows the longest answer of the split, and it stays near it (a rambling base is cut early)."""
    from titok.models import load_tokenizer
    from titok.tasks import reference_response

    tokenizer = load_tokenizer("smollm2-135m")
    examples = load_task("boolean_expressions", n_test=20).test_examples
    lengths = [len(tokenizer(reference_response(e), add_special_tokens=False)["input_ids"]) for e in examples]
    budget = answer_budget("smollm2-135m", examples)
    assert all(budget >= 1.2 * n for n in lengths) and budget <= 1.5 * max(lengths) + 16
    shortest = [examples[lengths.index(min(lengths))]]
    assert answer_budget("smollm2-135m", shortest) < budget  # it is the longest answer that sets it
