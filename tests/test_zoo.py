"""``titok migrate`` on tiny models over the real SmolLM2 / Gemma-3 tokenizers: shared engines (the
source model loads once per actor), failures isolated per adapter, kill after scores and resume,
the same training rows as a lone transplant, and every manifest error reported before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from titok import columns as C
from titok.config import ConfigError
from titok.runstate import EVENTS_DIR, RunDir
from titok.workflows.zoo import load_manifest, migrate, validate_manifest
from titok.workflows.zoo_report import gate_rule

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo_adapters(tiny_model_dirs, tmp_path_factory):
    """Two more source adapters (other seeds, other targets), one truncated copy, one from another base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("zoo-adapters")
    made = {"bool-a": tiny_model_dirs["adapter"]}
    for name, seed, modules in (("count-b", 1, ["q_proj", "k_proj", "v_proj"]), ("count-c", 2, ["o_proj"])):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["source"])
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)).save_pretrained(root / name)
        made[name] = str(root / name)
    shutil.copytree(made["count-b"], root / "torn")
    weights = root / "torn" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["torn"] = str(root / "torn")
    shutil.copytree(made["count-b"], root / "other-base")
    config = json.loads((root / "other-base" / "adapter_config.json").read_text())
    (root / "other-base" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/else"}))
    made["other-base"] = str(root / "other-base")
    return made


def _manifest(dirs: dict, adapters: dict, out: Path) -> dict:
    return {
        "source_base": dirs["source"], "target_base": dirs["target"], "out_dir": str(out),
        "defaults": {"engine": {"dtype": "float32", "batch_size": 4, "max_length": 160},
                     "queries": {"few_shot": 2, "pool_size": 12, "max_new_tokens": 16, "max_rounds": 3, "on_task": False},
                     "labels": {"max_new_tokens": 20}, "filter": {"top_m": 6, "k": 0.7},
                     "train": {"workers": 2, "epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
                               "dtype": "float32"}},
        "adapters": [
            {"name": "bool-a", "path": adapters["bool-a"], "task": "boolean_expressions"},
            {"name": "bool-torn", "path": adapters["torn"], "task": "boolean_expressions"},
            {"name": "count-b", "path": adapters["count-b"], "task": "object_counting"},
            # a learning rate that blows the weights up: a non-finite loss at its second step, its failure alone
            {"name": "count-c", "path": adapters["count-c"], "task": "object_counting",
             "overrides": {"train": {"lr": 1.0e30}}},
        ],
        "gate": {"examples": 4, "batch_size": 4, "dtype": "float32", "max_new_tokens": 8},
    }


def _model_loads(root: Path) -> list[dict]:
    return [e for path in sorted(root.rglob(EVENTS_DIR)) for e in RunDir(path.parent).events() if e["event"] == "model_load"]


def _migrate_until_scores_then_kill(manifest_path: Path, out: Path, live: list[str]) -> None:
    process = subprocess.Popen([sys.executable, "-m", "titok.cli", "migrate", "--manifest", str(manifest_path)], cwd=REPO,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        deadline = time.time() + 900
        while not all((out / "runs" / name / "scores" / "_COMPLETE.json").is_file() for name in live):
            assert process.poll() is None, "the migration ended before every adapter was scored"
            assert time.time() < deadline, "scores did not complete in 15 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not any((out / "runs" / name / "train" / "_COMPLETE.json").exists() for name in live)


@pytest.mark.slow
def test_a_zoo_migrates_with_shared_engines_isolated_failures_and_resume(tiny_model_dirs, zoo_adapters, tmp_path, local_ray):
    out = tmp_path / "zoo"
    manifest_path = tmp_path / "zoo.yaml"
    manifest_path.write_text(yaml.safe_dump(_manifest(tiny_model_dirs, zoo_adapters, out)))
    manifest = load_manifest(str(manifest_path))

    _migrate_until_scores_then_kill(manifest_path, out, ["bool-a", "count-b", "count-c"])
    engine_loads = [e for e in RunDir(out).events() if e["event"] == "model_load"]
    assert len(engine_loads) == manifest.defaults.engine.actors == 1  # not once per adapter
    assert engine_loads[0]["stage"] == "engine"

    record = migrate(manifest)  # the resubmitted job
    rows = {row["name"]: row for row in record["adapters"]}
    assert {n: r["status"] for n, r in rows.items()} == {"bool-a": "migrated", "bool-torn": "failed",
                                                        "count-b": "migrated", "count-c": "failed"}
    assert "cannot be read as safetensors" in rows["bool-torn"]["reason"] and rows["bool-torn"]["stage"] == "validate"
    assert rows["count-c"]["stage"] == "train" and "non-finite" in rows["count-c"]["reason"]
    # resumed after scores: no engine started again; the three trainings shared one worker group,
    # which loaded the target once per worker (not once per adapter)
    zoo_loads = [e for e in RunDir(out).events() if e["event"] == "model_load"]
    assert zoo_loads[:1] == engine_loads and len(zoo_loads) == 1 + 2
    assert all(e["stage"] == "train" and e["adapters"] == ["bool-a", "count-b", "count-c"] for e in zoo_loads[1:])
    assert record["model_loads"] == {"source_engines": 1, "training_workers": 2}
    shared = [(e["stage"], e["adapters"]) for e in RunDir(out).events() if e["event"] == "shared_pass"]
    # one Ray Data pass filtered every pool (groupby adapter) and aligned the kept rows (one tokenizer
    # actor); one worker group trained them all; zoo.json says how long each took
    assert shared == [("filter+align", ["bool-a", "count-b", "count-c"]), ("train", ["bool-a", "count-b", "count-c"])]
    assert [(p["stage"], p["adapters"]) for p in record["shared_passes"]] == shared
    assert all(p["seconds"] > 0 for p in record["shared_passes"])
    assert "Shared passes (seconds in no adapter's row): filter+align" in (out / "summary.md").read_text()
    assert (out / "runs" / "count-c" / "queries" / "_COMPLETE.json").read_text() == \
        (out / "runs" / "count-b" / "queries" / "_COMPLETE.json").read_text()  # written once for the task, shared
    for name in ("bool-a", "count-b"):
        assert rows[name]["stages"]["scores"] == "cached" and rows[name]["stages"]["train"] == "ran"
        assert not [e for e in RunDir(out / "runs" / name).events() if e["event"] == "model_load"]

    # the zoo folder
    for name in ("bool-a", "count-b"):
        folder = out / "adapters" / name
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "titok.json", "provenance.json"} <= \
            {p.name for p in folder.iterdir()}
        origin = json.loads((folder / "provenance.json").read_text())
        assert origin["source_adapter"]["path"] == zoo_adapters[name] and origin["config"]["task"] == rows[name]["task"]
        assert origin["source_base"]["config_sha256"] and origin["target_base"]["chat_template_sha256"]
        gate = rows[name]["gate"]
        assert gate["n"] == 4 and gate["metric"] == "exact_match" and isinstance(gate["passed"], bool)
    serving = yaml.safe_load((out / "serve.yaml").read_text())
    assert serving == {"model": tiny_model_dirs["target"], "enable-lora": True, "max-loras": 2, "max-cpu-loras": 2,
                       "max-lora-rank": 8, "lora-modules": ["bool-a=adapters/bool-a", "count-b=adapters/count-b"],
                       "chat-template": "adapters/bool-a/chat_template.jinja"}
    assert (out / "adapters" / "bool-a" / "chat_template.jinja").is_file() and not (out / "lora-modules.json").exists()
    summary = (out / "summary.md").read_text()
    assert "2 of 4 adapters migrated" in summary and "| bool-torn | boolean_expressions | failed |" in summary
    assert len(pd.read_csv(out / "summary.csv")) == 4

    # a rerun redoes no finished adapter (it loads a model only to retry the failed count-c's training)
    loads = _model_loads(out)
    weights = (out / "adapters" / "bool-a" / "adapter_model.safetensors").read_bytes()
    again = {row["name"]: row for row in migrate(manifest)["adapters"]}
    retried = [e for e in _model_loads(out) if e not in loads]
    assert len(retried) == 2 and all(e["stage"] == "train" and e["adapters"] == ["count-c"] for e in retried)
    assert not (out / "trainings").exists()  # the worker groups' checkpoints go once every outcome is taken
    assert again["count-c"]["status"] == "failed"
    assert all(set(again[n]["stages"].values()) <= {"cached", "ran"} and again[n]["stages"]["train"] == "cached"
               for n in ("bool-a", "count-b"))
    assert (out / "adapters" / "bool-a" / "adapter_model.safetensors").read_bytes() == weights

    # the zoo's count-b (not the engines' first adapter) has the rows of a lone transplant of it, up to
    # the training data: no other adapter leaked into its batches. That a shared worker group trains
    # each job's rows into the adapter a group of its own makes is test_train's (as-if-alone test).
    from titok.workflows.pipeline import transplant
    from titok.workflows.zoo import adapter_config

    alone_cfg = adapter_config(manifest, manifest.adapters[2]).model_copy(update={"run_dir": str(tmp_path / "alone")})
    transplant(alone_cfg, until="align")
    for stage in ("labels", "scores", "filter", "align"):
        zoo_rows = pd.read_parquet(out / "runs" / "count-b" / stage).sort_values(C.SAMPLE_ID).reset_index(drop=True)
        alone_rows = pd.read_parquet(tmp_path / "alone" / stage).sort_values(C.SAMPLE_ID).reset_index(drop=True)
        assert list(zoo_rows[C.RESPONSE]) == list(alone_rows[C.RESPONSE])
        if stage == "scores":
            for a, b in zip(zoo_rows[C.EXCESS], alone_rows[C.EXCESS]):
                np.testing.assert_allclose(a, b, atol=1e-5)
        if stage in ("filter", "align"):  # the zoo's one-pool filter keeps what the distributed one keeps
            assert sorted(zoo_rows.columns) == sorted(alone_rows.columns)
            column = C.KEEP if stage == "filter" else C.TARGET_WEIGHTS
            for a, b in zip(zoo_rows[column], alone_rows[column]):
                np.testing.assert_array_equal(a, b)


def test_every_manifest_error_is_reported_at_once_before_any_model_loads(tiny_model_dirs, zoo_adapters, tmp_path):
    import ray

    data = _manifest(tiny_model_dirs, zoo_adapters, tmp_path / "zoo")
    data["adapters"] = [
        {"name": "bool-a", "path": zoo_adapters["bool-a"], "task": "boolean_expressions"},
        {"name": "missing", "path": str(tmp_path / "nowhere"), "task": "boolean_expressions"},
        {"name": "elsewhere", "path": zoo_adapters["other-base"], "task": "object_counting"},
        {"name": "no-task", "path": zoo_adapters["count-b"], "task": "no_such_task"},
    ]
    manifest = load_manifest(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])
    ray_was_up = ray.is_initialized()
    with pytest.raises(ConfigError) as refused:
        validate_manifest(manifest)
    message = str(refused.value)
    assert "adapters[missing].path" in message and "does not exist" in message
    assert "adapters[elsewhere].path" in message and "was trained on 'someone/else'" in message
    assert "adapters[no-task].task" in message
    assert "bool-a" not in message
    assert not (tmp_path / "zoo").exists() and ray.is_initialized() == ray_was_up  # Ray was not started

    cased = [*data["adapters"], {**data["adapters"][0], "name": "Bool-A"}]
    with pytest.raises(ConfigError, match=r"adapter names \['Bool-A', 'bool-a'\] differ only in case"):
        load_manifest(None, [f"adapters={json.dumps(cased)}", f"source_base={data['source_base']}",
                             f"target_base={data['target_base']}"])
    data["adapters"].append(dict(data["adapters"][0]))
    with pytest.raises(ConfigError, match=r"adapter names listed twice: \['bool-a'\]"):
        load_manifest(None, [f"adapters={json.dumps(data['adapters'])}", f"source_base={data['source_base']}",
                             f"target_base={data['target_base']}"])


def test_shared_settings_cannot_be_overridden_per_adapter(tiny_model_dirs, zoo_adapters, tmp_path):
    data = _manifest(tiny_model_dirs, zoo_adapters, tmp_path / "zoo")
    data["adapters"][0]["overrides"] = {"engine": {"batch_size": 2}}
    with pytest.raises(ConfigError, match="cannot differ between adapters"):
        load_manifest(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])
    # defaults and overrides are typed: a bad field is named where it is, when the manifest is read
    data["adapters"][0]["overrides"] = {"filter": {"k": 2}}
    with pytest.raises(ConfigError, match=r"adapters\.0\.overrides\.filter\.k"):
        load_manifest(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])
    data["adapters"][0]["overrides"] = {}
    data["defaults"]["train"]["epoch"] = 1
    with pytest.raises(ConfigError, match=r"defaults\.train\.epoch"):
        load_manifest(None, [f"{k}={json.dumps(v)}" for k, v in data.items()])


@pytest.mark.parametrize("expert,vanilla,migrated,min_retained,majority,passed,retained", [
    (0.8, 0.2, 0.5, 0.5, None, True, 0.5),
    (0.8, 0.2, 0.4, 0.5, None, False, 1 / 3),
    (0.8, 0.2, 0.9, 0.5, 0.55, True, 7 / 6),
    (0.2, 0.2, 0.9, 0.5, None, False, None),  # the expert gained nothing over vanilla: nothing to keep
    # the zoo demo's arithmetic row: one example of 20 right, below always answering the most common answer
    (0.05, 0.0, 0.05, 0.5, 0.10, False, 1.0),
    (0.20, 0.0, 0.15, 0.5, 0.20, False, 0.75),  # equal to the majority rate is no skill either
])
def test_gate_rule(expert, vanilla, migrated, min_retained, majority, passed, retained):
    ok, share, why = gate_rule(expert, vanilla, migrated, min_retained, majority)
    assert ok is passed and why
    if majority is not None and not passed:
        assert "majority rate" in why
    assert share == (None if retained is None else pytest.approx(retained))


def test_the_gate_refuses_an_adapter_that_gives_one_answer_to_everything():
    """navigate onto Gemma-3-270M: "False" to 49 of 50 questions, 0.50 exact match against a vanilla
    0.00, 98% of the expert's gain kept by arithmetic, and no skill at all."""
    from titok.core.metrics import answer_spread, collapse_text

    report = {"n": 50, **answer_spread(["False"] * 49 + ["True"], ["True", "False"] * 25)}
    ok, share, why = gate_rule(0.51, 0.0, 0.50, 0.5, 0.5, collapse_text(report))
    assert not ok and share == pytest.approx(0.50 / 0.51) and why.startswith("answers 'false' to 49 of 50")


@pytest.mark.parametrize("spec", ["smollm2-135m", "gemma3-270m"])  # its own template; none (titok's plain one)
def test_provenance_hashes_the_chat_template_the_tokenizer_gets_without_loading_it(spec, tmp_path):
    import hashlib

    from titok.models import chat_template_text, folder_chat_template, load_tokenizer, resolve_model_path
    from titok.workflows.zoo_report import _model_fingerprint

    expected = hashlib.sha256(load_tokenizer(spec).chat_template.encode()).hexdigest()[:16]
    assert folder_chat_template(resolve_model_path(spec)) is not None  # read from the folder
    assert _model_fingerprint(spec, False)["chat_template_sha256"] == expected
    assert chat_template_text(spec) == load_tokenizer(spec).chat_template  # what an exported adapter ships
    folder = tmp_path / "named"  # transformers' list form of several named templates
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "{{x}}"}]}))
    assert folder_chat_template(folder) == {"default": "{{x}}"}
    assert chat_template_text(str(folder)) == "{{x}}"
