"""The lm-evaluation-harness bridge: ``titok eval --harness`` runs lm-eval's HF backend on the base +
adapter, with the chat template the adapter shipped, offline, on a task of the user's own."""

import json
import shutil

import pytest

from titok.cli import main
from titok.models import PLAIN_CHAT_TEMPLATE, load_tokenizer
from titok.core.sequences import format_prompt

_TASK = """task: titok_local_bool
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{input}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def local_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"input": f"not {a} and {b} is", "target": str((not a) and b)} for a in (True, False) for b in (True, False)]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "local.yaml").write_text(_TASK.format(data=folder / "data.jsonl"))
    return folder, rows


@pytest.mark.slow
def test_harness_evaluates_the_adapter_with_its_chat_template(tiny_model_dirs, tmp_path, local_task, local_ray,
                                                             monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, rows = local_task
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model_dirs["adapter"], adapter)
    (adapter / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE)  # not SmolLM2's own: it must be the one used
    main(["eval", "--base", tiny_model_dirs["source"], "--adapter", str(adapter), "--examples", "3",
          "--harness", "titok_local_bool", "--harness-include", str(folder), "--out", str(tmp_path / "out" / "eval.json")])
    results = json.loads((tmp_path / "out" / "eval.lm-eval.json").read_text())
    assert (tmp_path / "out" / "eval.json").is_file()  # titok's own report beside it
    assert results["n-samples"]["titok_local_bool"] == {"original": 4, "effective": 3}
    assert 0.0 <= results["results"]["titok_local_bool"]["exact_match,none"] <= 1.0
    assert results["titok"]["chat_template"] == PLAIN_CHAT_TEMPLATE and results["titok"]["adapter"] == "adapter"
    tokenizer = load_tokenizer(tiny_model_dirs["source"])
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    prompts = [sample["arguments"][0][0] for sample in results["samples"]["titok_local_bool"]]
    assert prompts == [format_prompt(tokenizer, row["input"]) for row in rows[:3]]
    assert "titok_local_bool" in capsys.readouterr().out  # lm-eval's table


def test_an_unknown_harness_task_is_refused_before_any_model_loads(tiny_model_dirs, tmp_path, local_task, capsys):
    import ray

    folder, _ = local_task
    ray_was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as refused:
        main(["eval", "--base", tiny_model_dirs["source"], "--harness", "titok_local_boool", "--harness-include", str(folder)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "harness: lm-eval has no task ['titok_local_boool']" in err
    assert ray.is_initialized() == ray_was_up
