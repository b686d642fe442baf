"""One typed config for a transplant: YAML in, ``--set key=value`` overrides, validated before compute.

    titok transplant --config configs/demo.yaml --set filter.top_m=16 --set train.deepspeed_stage=3

Every field has a description (``titok transplant --help-config`` prints them all). Unknown keys and
wrong types are errors that name the field; cross-field checks (M <= pool, adapter files present,
adapter trained on the source base) run in ``validate_inputs`` before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "EngineConfig",
    "FilterConfig",
    "LabelsConfig",
    "LoraShape",
    "QueriesConfig",
    "TrainConfig",
    "TransplantConfig",
    "apply_overrides",
    "check_model",
    "check_task",
    "describe_fields",
    "load_config",
    "read_yaml",
    "validate_inputs",
    "validated",
]


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted field path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraShape(_Section):
    rank: int = Field(8, ge=1, description="LoRA rank r of the target adapter")
    alpha: int = Field(8, ge=1, description="LoRA alpha (scaling = alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, description="module names that get LoRA")


class EngineConfig(_Section):
    name: Literal["transformers", "vllm"] = Field(
        "transformers", description="inference engine for generation and scoring: transformers (CPU/GPU) or vllm (GPU)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="weights dtype for inference")
    actors: int = Field(1, ge=1, description="actors per generation/scoring stage (one model copy each)")
    gpus_per_actor: float = Field(
        0.0, ge=0.0, description="GPUs per inference actor (0 = CPU); with vllm, N >= 2 shards the model over N GPUs (tensor parallel)"
    )
    batch_size: int = Field(8, ge=1, description="rows per map_batches call")
    max_length: int = Field(512, ge=16, description="max prompt+response tokens when scoring and training")
    vllm_score_tolerance: float = Field(
        0.05, gt=0.0, description="max |vLLM - transformers| log-prob on the calibration sample before vLLM scoring is refused"
    )


class QueriesConfig(_Section):
    few_shot: int = Field(3, ge=1, description="seed examples shown in each query-writing prompt")
    pool_size: int | None = Field(None, ge=1, description="synthetic queries to collect (default 2 x filter.top_m)")
    rouge_l_max: float = Field(0.7, gt=0.0, le=1.0, description="keep a query only if its ROUGE-L to every kept query and seed is below this")
    max_rounds: int = Field(8, ge=1, description="query-writing rounds before giving up on filling the pool")
    oversample: float = Field(1.5, ge=1.0, description="prompts per missing query in each round")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature for query writing")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling for query writing")
    max_new_tokens: int = Field(64, ge=1, description="token budget of one synthetic query")


class LabelsConfig(_Section):
    max_new_tokens: int = Field(128, ge=1, description="token budget of one expert response")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy expert responses")


class FilterConfig(_Section):
    top_m: int = Field(250, ge=1, description="M: samples kept by mean excess")
    k: float = Field(0.7, gt=0.0, le=1.0, description="fraction of tokens kept inside the kept samples")
    token_scope: Literal["per_sample", "per_batch", "global"] = Field(
        "per_sample", description="rank tokens per sample, per group of group_size samples, or over all kept samples"
    )
    group_size: int = Field(4, ge=1, description="samples per group for token_scope=per_batch")
    method: Literal["titok", "kd", "random_m", "top_m_only", "top_k_only"] = Field(
        "titok", description="titok = top-M samples + top-k% tokens; baselines/ablations on the same synthetic data: "
        "kd = all samples, all tokens; random_m = M random samples, all tokens; top_m_only = top-M samples, all "
        "tokens; top_k_only = all samples, top-k% tokens"
    )


class TrainConfig(_Section):
    lora: LoraShape = Field(default_factory=LoraShape)
    workers: int = Field(2, ge=1, description="Ray Train workers (one process, and GPU if use_gpu, each)")
    use_gpu: bool = Field(False, description="train on GPUs")
    deepspeed_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (configs in cluster/deepspeed/)")
    epochs: int = Field(2, ge=1, description="passes over the selected data")
    batch_size: int = Field(4, ge=1, description="samples per worker per step")
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="linear warm-up share of all steps")
    max_grad_norm: float = Field(0.3, gt=0.0, description="gradient clipping")
    normalization: Literal["selected_mean", "rho1"] = Field("selected_mean", description="selective-loss normalization")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="training dtype of the target base")


class TransplantConfig(_Section):
    source_base: str = Field(..., description="source base model: short name, .gguf file, HF folder or hub id")
    source_adapter: str = Field(..., description="folder of the source PEFT LoRA trained on source_base")
    target_base: str = Field(..., description="target base model (same forms as source_base)")
    task: str = Field(..., description="built-in task name (boolean_expressions) or a BBH-format JSON file")
    run_dir: str = Field("runs/transplant", description="stage outputs, checkpoints and the final adapter go here")
    seed: int = Field(0, description="seed for sampling, shuffling and initialization")
    split_seed: int = Field(
        0, description="seed of the task's seed/train/test split; fixed across transplant seeds, so every run is "
        "evaluated on the same held-out examples and never sees them"
    )
    trust_remote_code: bool = Field(False, description="allow model repos to run their own code")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _pool_holds_m(self) -> "TransplantConfig":
        if self.queries.pool_size is not None and self.filter.top_m > self.queries.pool_size:
            raise ValueError(
                f"filter.top_m={self.filter.top_m} is larger than queries.pool_size={self.queries.pool_size}"
            )
        return self

    @property
    def pool_size(self) -> int:
        return self.queries.pool_size or 2 * self.filter.top_m


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    node[leaf] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` strings onto a config dict; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def read_yaml(path: str | Path | None, overrides: list[str] = (), **fields: Any) -> dict:
    """A YAML mapping (optional) with keyword fields and ``--set`` overrides applied, not yet validated."""
    data: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a YAML mapping")
        data.update(loaded)
    data.update(fields)
    return apply_overrides(data, list(overrides))


def validated(model: type[BaseModel], data: dict, what: str):
    """``model`` from ``data``, or a ConfigError that names every bad field by its dotted path."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid {what} config: {problems}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), **fields: Any) -> TransplantConfig:
    """Read YAML (optional), apply overrides and keyword fields, validate types and ranges."""
    return validated(TransplantConfig, read_yaml(path, overrides, **fields), "transplant")


def validate_inputs(cfg: TransplantConfig) -> None:
    """Checks that need the file system or the task, run before any model is loaded."""
    from titok.models import resolve_model_path

    adapter = Path(cfg.source_adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"source_adapter: {adapter} has no adapter_config.json (not a PEFT adapter folder)")
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"source_adapter: {adapter} has no adapter_model.safetensors")
    adapter_base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    source = resolve_model_path(cfg.source_base)
    if adapter_base and adapter_base not in (cfg.source_base, source):
        raise ConfigError(
            f"source_adapter: {adapter} was trained on {adapter_base!r}, not on source_base {cfg.source_base!r} ({source})"
        )
    for field in ("source_base", "target_base"):
        check_model(field, getattr(cfg, field), cfg.trust_remote_code)
    task = check_task("task", cfg.task, cfg.split_seed)
    if len(task.seed_examples) < cfg.queries.few_shot:
        raise ConfigError(
            f"queries.few_shot={cfg.queries.few_shot} but task {cfg.task!r} has only {len(task.seed_examples)} seed examples"
        )


def check_model(field: str, spec: str, trust_remote_code: bool = False) -> None:
    """A model spec resolves (short names convert their GGUF once) and its config loads: a folder
    without a model or a hub id that does not exist (or is unreachable) fails here, not in an actor."""
    from transformers import AutoConfig

    from titok.models import resolve_model_path

    try:
        resolved = resolve_model_path(spec)
    except FileNotFoundError as err:
        raise ConfigError(f"{field}: {err}") from None
    if Path(resolved).exists() and not (Path(resolved) / "config.json").is_file():
        raise ConfigError(f"{field}: {resolved} has no config.json (not a model folder)")
    try:
        AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}: cannot load the model config of {spec!r}: {str(err).splitlines()[0]}") from None


def check_task(field: str, spec: str, split_seed: int):
    from titok.tasks import load_task

    try:
        return load_task(spec, seed=split_seed)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}") from None


def describe_fields(model: type[BaseModel] = TransplantConfig, prefix: str = "") -> list[str]:
    """``dotted.name (type, default): description`` for every field, for ``--help-config``."""
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        type_name = getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
        lines.append(f"{prefix}{name} ({type_name}, {default}): {field.description}")
    return lines
