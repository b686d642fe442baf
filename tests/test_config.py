from pathlib import Path

import pytest

from titok.config import ConfigError, describe_fields, load_config
from titok.validate import validate_inputs
from titok.cli import main

BASE = {"source_base": "smollm2-135m", "source_adapter": "x", "target_base": "gemma3-270m", "task": "boolean_expressions"}


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source_base: a\nsource_adapter: b\ntarget_base: c\ntask: boolean_expressions\nfilter:\n  top_m: 8\n")
    cfg = load_config(path, ["filter.k=0.5", "train.lora.target_modules=[q_proj, k_proj]", "train.deepspeed_stage=3"])
    assert (cfg.filter.top_m, cfg.filter.k, cfg.train.deepspeed_stage) == (8, 0.5, 3)
    assert cfg.train.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.pool_size == 16  # 2 x M by default


@pytest.mark.parametrize("override,field", [
    ("filter.k=1.5", "filter.k"), ("filter.k=0", "filter.k"), ("engine.name=tensorrt", "engine.name"),
    ("filter.top_m=0", "filter.top_m"), ("train.deepspeed_stage=1", "train.deepspeed_stage"),
    ("filter.typo=1", "filter.typo"), ("train.workers=two", "train.workers"), ("filter.method=distill", "filter.method"),
])
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override], **BASE)


def test_m_larger_than_pool_is_rejected():
    with pytest.raises(ConfigError, match="filter.top_m=10 is larger than queries.pool_size=5"):
        load_config(None, ["filter.top_m=10", "queries.pool_size=5"], **BASE)


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="target_base"):
        load_config(None, [], source_base="a", source_adapter="b", task="t")


def test_adapter_checks_run_before_any_model_loads(tmp_path, tiny_model_dirs):
    cfg = load_config(None, [], **{**BASE, "source_adapter": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="missing does not exist"):
        validate_inputs(cfg)
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        validate_inputs(load_config(None, [], **{**BASE, "source_adapter": str(tmp_path / "weightless")}))
    # the tiny adapter was trained on the tiny source model, not on SmolLM2-135M
    with pytest.raises(ConfigError, match="was trained on"):
        validate_inputs(load_config(None, [], **{**BASE, "source_adapter": tiny_model_dirs["adapter"]}))
    ok = load_config(None, [], source_base=tiny_model_dirs["source"], source_adapter=tiny_model_dirs["adapter"],
                     target_base=tiny_model_dirs["target"], task="boolean_expressions")
    validate_inputs(ok)
    with pytest.raises(ConfigError, match="neither a built-in task"):
        validate_inputs(ok.model_copy(update={"task": str(tmp_path / "nope.json")}))


def test_a_target_that_does_not_exist_is_named_before_any_model_loads(tmp_path, tiny_model_dirs, monkeypatch):
    import huggingface_hub.constants

    # a hub id that is not cached cannot be reached offline: the same error path, without network timeouts
    # (the hub library reads HF_HUB_OFFLINE once, when imported, so the setting itself is patched too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ok = load_config(None, [], source_base=tiny_model_dirs["source"], source_adapter=tiny_model_dirs["adapter"],
                     target_base=tiny_model_dirs["target"], task="boolean_expressions")
    with pytest.raises(ConfigError, match="target_base: cannot load the model config of 'no-such-org/no-such-model'"):
        validate_inputs(ok.model_copy(update={"target_base": "no-such-org/no-such-model"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="target_base: .*empty has no config.json"):
        validate_inputs(ok.model_copy(update={"target_base": str(tmp_path / "empty")}))


def test_every_field_is_described():
    lines = describe_fields()
    assert any(line.startswith("filter.k (float, 0.7)") for line in lines)
    assert all(not line.endswith("None") for line in lines)


def test_cli_reports_config_errors_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["transplant", "--set", "filter.k=2"])
    assert exit_info.value.code == 2
    assert "filter.k" in capsys.readouterr().err


def _fingerprints(cfg, run_dir) -> list[str]:
    """Every stage's fingerprint but the adapter export's, for ``cfg`` run in ``run_dir``."""
    from titok.workflows.pipeline import STAGES, StageRunner

    runner = StageRunner(cfg.model_copy(update={"run_dir": str(run_dir)}), engines=None)
    return [runner.fingerprint_of(stage) for stage in STAGES[:-1]]


def _changed_from(before: list[str], after: list[str]) -> str | None:
    """The first stage whose fingerprint differs, after checking that every stage after it differs too."""
    from titok.workflows.pipeline import STAGES

    changed = [stage for stage, a, b in zip(STAGES, before, after) if a != b]
    assert not changed or changed == list(STAGES[STAGES.index(changed[0]):-1])
    return changed[0] if changed else None


@pytest.mark.parametrize("override, first_changed", [
    ("engine.actors=4", None), ("engine.gpus_per_actor=1", None), ("train.workers=4", None),
    ("train.deepspeed_stage=3", None), ("filter.reference_batch_size=2", None),  # where and how fast: reused
    ("queries.pool_size=600", "queries"), ("labels.temperature=0.7", "labels"), ("engine.max_length=400", "queries"),
    ("filter.k=0.5", "filter"), ("filter.reference=target_base", "filter"), ("train.lr=0.01", "train"),
])
def test_a_run_is_reused_up_to_the_first_stage_a_setting_changes(tmp_path, tiny_model_dirs, override, first_changed):
    base = {**BASE, "source_adapter": tiny_model_dirs["adapter"]}
    before, after = _fingerprints(load_config(None, [], **base), tmp_path), _fingerprints(load_config(None, [override], **base), tmp_path)
    assert _changed_from(before, after) == first_changed


def test_labels_follow_the_source_adapters_weights_not_its_path(tmp_path, tiny_model_dirs):
    """A copy of the adapter (or another spelling of its path) reuses the run; the adapter retrained in
    place (new weights, same folder) is labelled again, with every stage after."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "adapter-copy"
    shutil.copytree(tiny_model_dirs["adapter"], copy)

    def fingerprints(adapter: str) -> list[str]:
        return _fingerprints(load_config(None, [], **{**BASE, "source_adapter": adapter}), tmp_path)

    original = fingerprints(tiny_model_dirs["adapter"])
    assert fingerprints(str(copy)) == original
    assert fingerprints(str(copy / ".." / copy.name)) == original
    weights = load_file(copy / "adapter_model.safetensors")
    save_file({name: tensor * 2 for name, tensor in weights.items()}, copy / "adapter_model.safetensors")
    assert _changed_from(original, fingerprints(str(copy))) == "labels"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_reads_with_its_loader(path):
    """A field renamed or retyped in the code is caught in the recipes users copy, not in their run."""
    import yaml

    from titok.workflows.compare import load_compare_config
    from titok.config import load_config
    from titok.workflows.zoo import load_manifest

    data = yaml.safe_load(path.read_text())
    if "targets" in data:
        load_compare_config(str(path))
    elif "adapters" in data:
        load_manifest(str(path), [])
    else:
        load_config(str(path))
