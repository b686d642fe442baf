"""Bad input never costs compute or data: each of these is refused with one message naming the field
or file, before any model loads or Ray starts, and a finished run directory and an exported adapter
beside it stay byte-for-byte as they were. (Damaged run directories healing themselves: the slow
test at the end.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from titok.cli import main
from titok.runstate import RunDir

TASK_ROWS = [{"input": f"question {i}?", "target": "yes" if i % 2 else "no"} for i in range(40)]


@pytest.fixture(scope="module")
def workspace(tiny_model_dirs, tmp_path_factory):
    """A finished run directory and an exported adapter beside it (the user's data), and the pieces
    the bad inputs are made of."""
    root = tmp_path_factory.mktemp("bad-inputs")
    run = RunDir(root / "finished-run")
    run.claim()
    for stage in ("queries", "labels", "scores"):
        run.start(stage, "fp-" + stage)
        pq.write_table(pa.table({"sample_id": [0, 1], "query": ["a", "b"]}), run.stage_dir(stage) / "rows.parquet")
        run.complete(stage, "fp-" + stage, rows=2)
    run.log_event(event="model_load", stage="engine")
    shutil.copytree(tiny_model_dirs["adapter"], root / "exported-adapter")
    (root / "task.json").write_text(json.dumps({"examples": TASK_ROWS}))
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.parts[len(root.parts)] in ("finished-run", "exported-adapter")}


@pytest.fixture
def refused(workspace, capsys):
    """Run a CLI command that must be refused: exit 2, one message naming ``expected``, no Ray
    started, no model loaded, the user's run dir and adapter untouched."""
    import ray

    def check(argv: list[str], expected: str) -> str:
        capsys.readouterr()  # what the test printed setting the case up is not the command's output
        before, ray_was_up = _snapshot(workspace), ray.is_initialized()
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert expected in err, err
        assert "Traceback" not in err and err.startswith("titok: ")
        assert ray.is_initialized() == ray_was_up  # refused before Ray started
        assert _snapshot(workspace) == before
        return err

    return check


def _config(dirs: dict, workspace: Path, tmp_path: Path, **sections) -> Path:
    data = {"source_base": dirs["source"], "source_adapter": dirs["adapter"], "target_base": dirs["target"],
            "task": "boolean_expressions", "run_dir": str(tmp_path / "run"),
            "engine": {"dtype": "float32", "batch_size": 4, "max_length": 160},
            "queries": {"few_shot": 2, "pool_size": 12, "max_new_tokens": 16, "on_task": False},
            "labels": {"max_new_tokens": 20}, "filter": {"top_m": 6},
            "train": {"workers": 2, "epochs": 1, "global_batch_size": 4, "micro_batch_size": 2}}
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    path = tmp_path / "transplant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _transplant(path: Path, *sets: str) -> list[str]:
    return ["transplant", "--config", str(path), *[arg for s in sets for arg in ("--set", s)]]


# ---------- the config itself ----------

@pytest.mark.parametrize("override,expected", [
    ("filter.bogus=1", "filter.bogus"),
    ("filter.k=2", "filter.k"),
    ("train.epochs=many", "train.epochs"),
    ("queries.pool_size=4", "filter.top_m=6 is larger than queries.pool_size=4"),
    ("train.global_batch_size=5", "global_batch_size=5 is not a multiple of workers=2"),
    ("train.global_batch_size=8", "train.global_batch_size=8 is larger than filter.top_m=6"),
    ("train.validation_fraction=0.5", "train.global_batch_size=4 is larger than filter.top_m=6 less the 3 "
                                      "train.validation_fraction holds out"),
    ("train.offload_params=true", "offload_params needs deepspeed_stage=3"),
    ("train.deepspeed_config=/nowhere/ds.json", "deepspeed_config: /nowhere/ds.json does not exist"),
    ("engine.tensor_parallel_size=2", "tensor/pipeline_parallel_size are vllm settings"),
    ("engine.name=vllm", None),  # placeholder replaced below
])
def test_config_values_that_cannot_work(tiny_model_dirs, workspace, tmp_path, refused, override, expected):
    if expected is None:  # vLLM with 2 GPUs per actor but tensor parallel 1
        refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path), "engine.name=vllm", "engine.gpus_per_actor=2"),
                "gpus_per_actor=2 must equal tensor_parallel_size x pipeline_parallel_size = 1")
        return
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path), override), expected)


def test_config_files_that_do_not_parse(workspace, tmp_path, refused):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  dtype: float32\n   batch_size: [4\n")
    refused(["transplant", "--config", str(bad)], f"{bad}:3:")
    refused(["transplant", "--config", str(tmp_path / "absent.yaml")], "absent.yaml: no such config file")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    refused(["transplant", "--config", str(listed)], "a config is a YAML mapping")
    refused(["transplant", "--set", "filter.k"], "--set expects key=value")
    refused(["transplant", "--set", "=3"], "--set '=3': no field name before '='")
    refused(["transplant", "--set", "filter.=3"], "--set 'filter.=3': no field name")
    twice = tmp_path / "twice.yaml"
    twice.write_text("filter:\n  top_m: 4\n  k: 0.5\n  top_m: 8\n")
    refused(["transplant", "--config", str(twice)], f"{twice}:4:3: not valid YAML (key 'top_m' is set twice (lines 2 and 4))")


@pytest.mark.parametrize("override,expected", [
    ("train.epochs=true", "train: Value error, epochs is a number, not true"),
    ("filter.top_m=false", "filter: Value error, top_m is a number, not false"),
    ("engine.gpus_per_actor=true", "engine: Value error, gpus_per_actor is a number, not true"),
])
def test_a_yes_no_is_not_a_number(tiny_model_dirs, workspace, tmp_path, refused, override, expected):
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path), override), expected)


@pytest.mark.parametrize("override", ["engine.gpus_per_actor=1", "train.use_gpu=true"])
def test_gpu_settings_on_a_machine_without_a_gpu(tiny_model_dirs, workspace, tmp_path, refused, override, monkeypatch):
    import torch

    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path), override),
            f"{override}: this machine has no GPU and titok starts a local Ray on it")


def test_a_run_dir_that_cannot_be_written(tiny_model_dirs, workspace, tmp_path, refused):
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path), "run_dir=/proc/titok-run"),
            "run_dir: /proc/titok-run cannot be written")


def test_dot_dot_through_a_missing_folder_is_checked_where_it_lands(tiny_model_dirs, workspace, tmp_path, refused):
    """``runs/nope/../../userdata/mydocs`` is the user's folder once ``nope`` exists: checked as that
    folder (it holds the user's files), not as a new one; nothing is made on the way."""
    mydocs = tmp_path / "userdata" / "mydocs"
    (mydocs / "queries").mkdir(parents=True)
    (mydocs / "queries" / "draft.txt").write_text("mine")
    (tmp_path / "runs").mkdir()
    sneaky = f"{tmp_path}/runs/nope/../../userdata/mydocs"
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path), f"run_dir={sneaky}"),
            f"run_dir: {mydocs} holds files titok did not write")
    refused(["eval", "--base", tiny_model_dirs["source"], "--out", f"{tmp_path}/runs/nope/../../userdata"],
            f"out: {tmp_path / 'userdata'} is a folder")
    refused(["sft", "--base", tiny_model_dirs["source"], "--out", sneaky], f"--out: {mydocs} holds files titok did not write")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"source_base": tiny_model_dirs["source"], "target_base": tiny_model_dirs["target"],
                                   "out_dir": sneaky, "adapters": [{"name": "a", "path": tiny_model_dirs["adapter"],
                                                                    "task": "boolean_expressions"}]}))
    refused(["migrate", "--config", str(zoo)], f"out_dir: {mydocs} holds files titok did not write")
    assert not (tmp_path / "runs" / "nope").exists() and (mydocs / "queries" / "draft.txt").read_text() == "mine"


# ---------- the source adapter ----------

def _adapter_variant(tiny_model_dirs, tmp_path, change) -> str:
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_model_dirs["adapter"], folder)
    change(folder)
    return str(folder)


def _edit_config(**fields):
    def change(folder: Path):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(fields)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return change


def _poison(folder: Path, value: float) -> None:
    """Every lora_B of the adapter set to ``value`` (NaN: a diverged training), shapes intact."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v.fill_(value) if "lora_B" in k else v for k, v in tensors.items()}, folder / "adapter_model.safetensors")


def _truncate(name: str, keep: float = 0.5):
    def change(folder: Path):
        path = folder / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return change


def _to_pickle(folder: Path):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


@pytest.mark.parametrize("change,expected", [
    (lambda f: shutil.rmtree(f), "does not exist"),
    (lambda f: (f / "adapter_config.json").unlink(), "has no adapter_config.json"),
    (lambda f: (f / "adapter_config.json").write_text("{r: 8,"), "is not valid JSON"),
    (_edit_config(r="eight"), "has no integer LoRA rank"),
    (_truncate("adapter_model.safetensors"), "cannot be read as safetensors"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "cannot be read as safetensors"),
    (_to_pickle, "only adapter_model.bin (pickle)"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    (_edit_config(r=8), "needs [8, 64]"),  # the tensors have rank 4
    (_edit_config(target_modules=["q_proj", "c_attn"]), "target_modules ['c_attn'] are not projections"),
    (_edit_config(base_model_name_or_path="someone/another-model"), "was trained on 'someone/another-model'"),
    (lambda f: _poison(f, float("nan")), "values NaN or inf (a training that diverged?)"),
    (lambda f: _poison(f, float("inf")), "values NaN or inf"),
])
def test_source_adapters_that_would_not_load(tiny_model_dirs, workspace, tmp_path, refused, change, expected):
    adapter = _adapter_variant(tiny_model_dirs, tmp_path, change)
    err = refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, source_adapter=adapter)), expected)
    assert "source_adapter" in err


def test_an_adapter_for_another_architecture(tiny_model_dirs, workspace, tmp_path, refused):
    """Gemma's LoRA on the Llama source: its projections have other sizes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["target"])
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "gemma-lora")
    _edit_config(base_model_name_or_path=tiny_model_dirs["source"])(tmp_path / "gemma-lora")
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, source_adapter=str(tmp_path / "gemma-lora"))),
            "has shape")


# ---------- the models ----------

def _model_variant(tiny_model_dirs, tmp_path, change) -> str:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["target"], folder)
    change(folder)
    return str(folder)


def _sharded(folder: Path):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("change,expected", [
    (lambda f: shutil.rmtree(f), "cannot load the model config"),
    (lambda f: (f / "config.json").unlink(), "has no config.json"),
    (lambda f: (f / "model.safetensors").unlink(), "a config but no weights"),
    (_truncate("model.safetensors", 0.3), "cannot be read as safetensors"),
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "only pickle weights"),
    (_sharded, "model-00002-of-00002.safetensors is missing"),
    (lambda f: (f / "model.safetensors.index.json").write_text("{"), "is not a valid weight index"),
])
def test_target_models_that_would_not_load(tiny_model_dirs, workspace, tmp_path, refused, change, expected):
    target = _model_variant(tiny_model_dirs, tmp_path, change)
    if "index" in expected:
        (Path(target) / "model.safetensors").unlink()
    err = refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, target_base=target)), expected)
    assert "target_base" in err


def test_a_model_folder_that_is_a_file(tiny_model_dirs, workspace, tmp_path, refused):
    (tmp_path / "model.txt").write_text("not a model")
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, source_base=str(tmp_path / "model.txt"))),
            "source_base: ")


# ---------- the task ----------

@pytest.mark.parametrize("content,expected", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"examples": [{"input": "a", "target": None}] + TASK_ROWS}), "has 'target': null"),
    (json.dumps({"examples": [{"input": f"q{i}", "target_scores": ["yes", "no"]} for i in range(20)]}), "target_scores"),
    (json.dumps([{"question": f"q{i}", "choices": [], "answer": 0} for i in range(20)]), "empty option set"),
    (json.dumps({"examples": TASK_ROWS + [{"input": "question 1?", "target": "maybe"}]}), "appears twice with different targets"),
    (json.dumps({"examples": TASK_ROWS[:5]}), "at least 10 are needed"),
    (json.dumps({"examples": [{"prompt": "a", "answer": "b"}] * 20}), "rows have fields ['answer', 'prompt']"),
])
def test_task_files_that_cannot_be_used(tiny_model_dirs, workspace, tmp_path, refused, content, expected):
    (tmp_path / "task.json").write_text(content)
    err = refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, task=str(tmp_path / "task.json"))), expected)
    assert "task" in err


def test_duplicated_inputs_never_reach_two_splits(workspace):
    from titok.tasks import load_task

    rows = TASK_ROWS + TASK_ROWS[:10]  # the same inputs, same targets, listed twice
    path = workspace.parent / "dupes.json"
    path.write_text(json.dumps({"examples": rows}))
    task = load_task(str(path))
    inputs = [e["input"] for e in task.seed_examples + task.train_examples + task.test_examples]
    assert len(inputs) == len(set(inputs)) == 40


def test_task_settings_that_do_not_fit(tiny_model_dirs, workspace, tmp_path, refused):
    config = _config(tiny_model_dirs, workspace, tmp_path)
    refused(_transplant(config, "task=no_such_task"), "neither a built-in task")
    refused(_transplant(config, "queries.few_shot=9"), "queries.few_shot=9 but task 'boolean_expressions' has only 8")
    refused(_transplant(config, "engine.max_length=20"), "engine.max_length=20 is shorter than")
    refused(_transplant(config, "train.max_length=20"), "train.max_length=20 is shorter than")


# ---------- where it writes ----------

def test_run_directories_titok_must_not_use(tiny_model_dirs, workspace, tmp_path, refused):
    (tmp_path / "a-file").write_text("mine")
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, run_dir=str(tmp_path / "a-file"))),
            "run_dir: ")
    mine = tmp_path / "my-documents"
    (mine / "queries").mkdir(parents=True)
    (mine / "queries" / "notes.txt").write_text("keep me")
    refused(_transplant(_config(tiny_model_dirs, workspace, tmp_path, run_dir=str(mine))), "holds files titok did not write")
    assert (mine / "queries" / "notes.txt").read_text() == "keep me"


# ---------- the other commands ----------

def test_sft_inputs(tiny_model_dirs, workspace, tmp_path, refused):
    (tmp_path / "a-file").write_text("mine")
    base = ["sft", "--base", tiny_model_dirs["source"]]
    refused(base + ["--out", str(tmp_path / "a-file")], "--out: ")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused(base + ["--out", str(tmp_path / "mine")], "--out: ")
    refused(base + ["--out", str(tmp_path / "new"), "--max-length", "20"], "max_length=20 (--max-length) leaves no room")
    refused(base + ["--out", str(tmp_path / "new"), "--max-length", "10"], "max_length: Input should be greater than or equal to 16")
    refused(base + ["--out", str(tmp_path / "new"), "--set", "lr=-1"], "lr")
    refused(base + ["--out", str(tmp_path / "new"), "--task", "no_such_task"], "--task")
    refused(["sft", "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")], "--base")
    refused(base + ["--out", str(tmp_path / "new"), "--set", "lora.target_modules=[q_proj, c_attn]"],
            "lora.target_modules: ['c_attn'] are not projections of")
    assert not (tmp_path / "new").exists()


def test_eval_inputs(tiny_model_dirs, workspace, tmp_path, refused):
    refused(["eval", "--base", tiny_model_dirs["source"], "--examples", "0"], "examples: Input should be greater than")
    refused(["eval", "--base", tiny_model_dirs["source"], "--n", "0"], "examples: Input should be greater than")  # old name
    refused(["eval", "--base", tiny_model_dirs["target"], "--adapter", tiny_model_dirs["adapter"]], "was trained on")
    refused(["eval", "--base", str(tmp_path / "nowhere")], "base: ")
    refused(["eval", "--base", tiny_model_dirs["source"], "--task", str(tmp_path / "nope.json")], "task: ")
    refused(["eval"], "base: Field required")
    # a config file, flags over it, --set over both: the same field names as the config's
    (tmp_path / "eval.yaml").write_text(f"base: {tiny_model_dirs['source']}\nexamples: 5\nbatch_szie: 4\n")
    refused(["eval", "--config", str(tmp_path / "eval.yaml")], "batch_szie")
    (tmp_path / "eval.yaml").write_text(f"base: {tiny_model_dirs['source']}\nexamples: 5\n")
    refused(["eval", "--config", str(tmp_path / "eval.yaml"), "--set", "examples=-3"], "examples: Input should be")
    refused(["eval", "--config", str(tmp_path / "eval.yaml"), "--examples", "0"], "examples: Input should be")
    refused(["eval", "--base", tiny_model_dirs["source"], "--max-new-tokens", "0"], "max_new_tokens: Input should be")
    (tmp_path / "reports").mkdir()
    refused(["eval", "--base", tiny_model_dirs["source"], "--out", str(tmp_path / "reports")], "is a folder; the report is")


def test_compare_inputs(tiny_model_dirs, workspace, tmp_path, refused):
    data = {"source_base": tiny_model_dirs["source"], "targets": [tiny_model_dirs["target"]], "tasks": ["boolean_expressions"],
            "out_dir": str(tmp_path / "compare")}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({**data, "targets": [tiny_model_dirs["target"]] * 2}))
    refused(["compare", "--config", str(path)], "listed twice")
    path.write_text(yaml.safe_dump({**data, "transplant": {"filter": {"method": "kd"}}}))
    refused(["compare", "--config", str(path)], "filter.method and filter.reference are set per run by compare")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    path.write_text(yaml.safe_dump({**data, "out_dir": str(tmp_path / "mine")}))
    refused(["compare", "--config", str(path)], "out_dir: ")


def test_folder_names_never_collide():
    from titok.layout import short_name

    assert short_name("a/task.json") != short_name("b/task.json")
    assert short_name("meta-llama/Llama-3.1-8B") != short_name("meta-llama/Llama-3.2-1B")
    assert short_name("org/Model-1") != short_name("other/Model-1")
    assert short_name("gemma3-270m") == "gemma3-270m"


# ---------- run directories that heal ----------

def _plain(value):
    """A stored cell as plain Python (nested list cells arrive as object arrays of arrays)."""
    if hasattr(value, "tolist") and getattr(value, "dtype", None) == object:
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


def _outputs(run_dir: Path) -> dict:
    import pandas as pd

    stages = {}
    for stage in ("queries", "labels", "scores", "filter", "align"):
        frame = pd.read_parquet(run_dir / stage).sort_values("sample_id").reset_index(drop=True)
        stages[stage] = frame.map(_plain).to_dict("list")
    stages["adapter"] = hashlib.sha256((run_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    return stages


@pytest.mark.slow
def test_damaged_run_directories_are_recomputed_and_end_as_an_untouched_run(tiny_model_dirs, tmp_path, local_ray, capsys,
                                                                           uninterrupted):
    from tests.conftest import tiny_transplant_config
    from titok.workflows.pipeline import transplant

    untouched = uninterrupted["run_dir"]  # the same config, run start to end
    expected = _outputs(untouched)

    faults = {
        # a torn completion marker; the trained adapter deleted (the exported one must survive until replaced)
        "marker-and-adapter": lambda run: ((run / "labels" / "_COMPLETE.json").write_text('{"fingerp'),
                                           shutil.rmtree(run / "train" / "adapter")),
        # a truncated Parquet; a job killed while writing queries (torn progress file, no queries marker)
        "parquet-and-progress": lambda run: (_truncate_file(next((run / "scores").glob("*.parquet"))),
                                             (run / "queries" / "_COMPLETE.json").unlink(),
                                             (run / "queries.progress.json").write_text('{"key": "ab')),
    }
    for name, damage in faults.items():
        run = tmp_path / name
        shutil.copytree(untouched, run)
        damage(run)
        capsys.readouterr()
        result = transplant(tiny_transplant_config(tiny_model_dirs, run))
        warned = capsys.readouterr().err
        assert "recomputing" in warned or "unreadable" in warned, warned
        assert any(info["status"] == "ran" for info in result["stages"].values())
        assert _outputs(run) == expected, name


def _truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("flag,value,expected", [
    ("--nodes", "0", "argument --nodes: 0 must be above 0"),
    ("--gpus-per-node", "-1", "argument --gpus-per-node: -1 must be above 0"),
    ("--gpu-memory-gib", "0", "argument --gpu-memory-gib: 0 must be above 0"),
    ("--gpu-tflops", "-5", "argument --gpu-tflops: -5 must be above 0"),
    ("--mfu-train", "0", "argument --mfu-train: 0 must be above 0 and at most 1"),
    ("--mfu-inference", "1.5", "argument --mfu-inference: 1.5 must be above 0 and at most 1"),
    ("--nodes", "two", "argument --nodes: 'two' is not an integer"),
])
def test_plan_numbers_that_mean_nothing(tmp_path, capsys, flag, value, expected):
    """Each refused by the command line itself (exit 2, one line), before a config is read."""
    with pytest.raises(SystemExit) as refused:
        main(["plan", "--config", str(tmp_path / "never-read.yaml"), flag, value])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.strip().splitlines()[-1].endswith(expected), err
