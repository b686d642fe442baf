"""One typed config for a transplant: YAML in, ``--set key=value`` overrides, validated before compute.

    titok transplant --config configs/demo.yaml --set filter.top_m=16 --set train.deepspeed_stage=3

Every field has a description (``titok transplant --help-config`` prints them all). Unknown keys and
wrong types are errors that name the field; cross-field checks (M <= pool, adapter files present,
adapter trained on the source base) run in ``titok.validate.validate_inputs`` before any model loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from titok.choices import (DEFAULT_ENGINE, ENGINES, FILTER_METHODS, PAPER_METHOD, REFERENCES, EngineName,
                           FilterMethodName, Normalization, Reference, TokenScope)
from titok.tasks import HELD_OUT_EXAMPLES

__all__ = [
    "METHODS",
    "SFT_DEFAULTS",
    "ClusterConfig",
    "CompareConfig",
    "ConfigError",
    "Section",
    "EngineConfig",
    "EvalConfig",
    "EvalSettings",
    "FilterConfig",
    "LabelsConfig",
    "LoraShape",
    "OutputPath",
    "QueriesConfig",
    "SourceSettings",
    "TrainConfig",
    "TransplantConfig",
    "resolved_path",
    "TransplantSettings",
    "apply_overrides",
    "describe_fields",
    "load_compare_config",
    "load_config",
    "merged_fields",
    "read_yaml",
    "sft_train_config",
    "validated",
]


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted field path."""


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo never passes silently), assignments are validated,
    and a yes/no is never a number (pydantic reads ``epochs: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, data):
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and _is_number(field.annotation):
                    raise ValueError(f"{name} is a number, not {str(value).lower()}")
        return data


def resolved_path(value: str) -> str:
    """An output folder as the file system will reach it: ``~`` expanded, symlinks followed and ``..``
    applied once, here, so that the checks (a new, empty or titok folder) and the run see one folder;
    ``runs/nope/../../mydocs`` is ``mydocs``, checked as such, not as a new folder under runs/."""
    import os

    return os.path.realpath(os.path.expanduser(value))


# every folder titok writes into: resolved before anything checks it
OutputPath = Annotated[str, AfterValidator(resolved_path)]


def _is_number(annotation) -> bool:
    """int or float (optionally None, or a choice between a number and a word such as 'auto'), never bool."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return bool not in options and any(option in (int, float) for option in options)


class LoraShape(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r of the target adapter")
    alpha: int = Field(8, ge=1, description="LoRA alpha (scaling = alpha / rank)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, description="module names that get LoRA")


class EngineConfig(Section):
    # where and on what the engines run: never changes what they compute (kept out of fingerprints)
    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = (
        "actors", "gpus_per_actor", "cpus_per_actor", "tensor_parallel_size", "pipeline_parallel_size",
        "gpu_memory_utilization", "max_num_batched_tokens", "max_loras", "max_cpu_loras")

    name: EngineName = Field(
        DEFAULT_ENGINE, description="inference engine for generation and scoring: "
        + "; ".join(f"{name} = {spec.description}" for name, spec in ENGINES.items()))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype for inference; auto = bf16 where the device runs it fast (CUDA with bf16, "
        "CPUs with AMX/AVX512-BF16), else fp32")
    actors: int = Field(1, ge=1, description="engine actors (one model copy each), kept for queries, labels and scores")
    gpus_per_actor: float = Field(
        0.0, ge=0.0, description="GPUs per engine actor (0 = CPU); vllm: tensor_parallel_size x pipeline_parallel_size; "
        "transformers: the model is split over them (device_map)")
    cpus_per_actor: int = Field(1, ge=1, description="CPU cores per engine actor (torch threads follow)")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one engine shards each layer over (one node)")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm: pipeline stages of one engine (may span nodes)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vllm: share of each GPU the engine may use")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="vllm: tokens per engine step (default: max(8192, max_length)); bounds activation and "
        "prompt-log-prob memory")
    max_loras: int = Field(2, ge=1, description="vllm: adapters resident on the GPU at once")
    max_cpu_loras: int | None = Field(None, ge=1, description="vllm: adapters cached in CPU memory (default: max_loras)")
    max_lora_rank: int | None = Field(
        None, ge=1, description="vllm: largest adapter rank (default: the source adapter's), rounded up to a rank vLLM "
        "accepts")
    batch_size: int = Field(8, ge=1, description="transformers: most rows per engine call (and per scoring batch); "
                            "vllm: most rows per scoring batch (a call takes the rows it is handed, vLLM batches them "
                            "continuously)")
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a lost engine actor (its batch is redone on a "
                              "free engine); one more loss stops the stage, and a rerun resumes")
    max_batch_tokens: int | None = Field(
        None, ge=16, description="transformers scoring: most padded tokens per batch over length-sorted pairs (none: "
        "batch_size rows)")
    max_length: int = Field(512, ge=16, description="max prompt+response tokens when scoring and training")
    vllm_score_tolerance: float = Field(
        0.05, gt=0.0, description="max |prefill - decode| log-prob on the calibration sample before vLLM scoring is refused"
    )

    def engine_settings(self) -> dict:
        """The fields the chosen engine alone is built with (``choices.ENGINES[name].settings``)."""
        return self.model_dump(include=set(ENGINES[self.name].settings))

    @model_validator(mode="after")
    def _parallelism(self) -> "EngineConfig":
        parallel = self.tensor_parallel_size * self.pipeline_parallel_size
        tensor_parallel = ENGINES[self.name].shards == "tensor_parallel"
        if not tensor_parallel and parallel > 1:
            raise ValueError(f"tensor/pipeline_parallel_size are vllm settings; the {self.name} engine splits a model "
                             "over its gpus_per_actor GPUs (device_map)")
        if tensor_parallel and self.gpus_per_actor > 0 and self.gpus_per_actor != parallel:
            raise ValueError(f"{self.name}: gpus_per_actor={self.gpus_per_actor:g} must equal tensor_parallel_size x "
                             f"pipeline_parallel_size = {parallel}")
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise ValueError(f"gpus_per_actor={self.gpus_per_actor:g}: above 1 it must be a whole number")
        if tensor_parallel and self.gpus_per_actor == 0 and parallel > 1:
            raise ValueError("tensor/pipeline parallelism needs GPUs: set gpus_per_actor")
        return self


class QueriesConfig(Section):
    few_shot: int = Field(3, ge=1, description="seed examples shown in each query-writing prompt")
    pool_size: int | None = Field(None, ge=1, description="synthetic queries to collect (default 2 x filter.top_m)")
    rouge_l_max: float = Field(0.7, gt=0.0, le=1.0, description="keep a query only if its ROUGE-L to every kept query and seed is below this")
    max_rounds: int = Field(8, ge=1, description="query-writing rounds before giving up on filling the pool")
    on_task: bool = Field(True, description="keep only queries shaped like the task's seed inputs (their length "
                          "window, option block, ending), before the ROUGE-L filter; rejections are counted by reason")
    oversample: float = Field(1.5, ge=1.0, description="prompts per missing query in each round")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature for query writing")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling for query writing")
    max_new_tokens: int = Field(64, ge=1, description="token budget of one synthetic query")


class LabelsConfig(Section):
    max_new_tokens: int = Field(128, ge=1, description="token budget of one expert response")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy expert responses")
    top_logprobs: int = Field(
        20, ge=0, le=100, description="the expert's n likeliest log-probs kept at every answer token (what the "
        "uld method distills; 0 keeps none, which saves vLLM's per-token log-prob lists on a large fleet)")


class FilterConfig(Section):
    # how fast, not what: kept out of fingerprints
    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = ("reference_batch_size", "reference_gpus")

    top_m: int = Field(250, ge=1, description="M: samples kept by mean excess")
    k: float = Field(0.7, gt=0.0, le=1.0, description="fraction of tokens kept inside the kept samples")
    token_scope: TokenScope = Field(
        "per_sample", description="rank tokens per sample, per group of group_size samples, or over all kept samples"
    )
    group_size: int = Field(4, ge=1, description="samples per group for token_scope=per_batch")
    method: FilterMethodName = Field(
        PAPER_METHOD, description="how samples and tokens are picked (baselines and ablations share the synthetic data): "
        + "; ".join(f"{name} = {m.description}" for name, m in FILTER_METHODS.items()))
    reference: Reference = Field(
        "source_amateur", description="what the expert is compared with to pick the top-k% tokens: source_amateur "
        "(the paper), target_base (the target's own log-probs of each aligned span: keeps what the target has "
        "not learned even where the source base predicts it) or both (kept if either finds it taught)")
    reference_batch_size: int = Field(
        8, ge=1, description="kept samples per target-base forward when the reference scores with the target base")
    reference_gpus: int = Field(
        1, ge=1, description="GPUs of one node the target base is split over (device_map) when the reference scores "
        "with it on GPUs (train.use_gpu): a 70B target in bf16 needs 2 x 80 GB (titok plan says how many)")

    @model_validator(mode="after")
    def _reference_scope(self) -> "FilterConfig":
        if self.reference != "source_amateur" and self.token_scope != "per_sample":
            raise ValueError(f"reference={self.reference} ranks target tokens per sample: set token_scope=per_sample")
        return self

    @property
    def token_reference(self) -> str:
        """The reference that picks tokens: only methods with a token filter have one."""
        return self.reference if FILTER_METHODS[self.method].token_filter else "source_amateur"

    @property
    def variant(self) -> str:
        """The method, with its token reference where it is not the paper's: ``titok:target_base``."""
        reference = self.token_reference
        return self.method if reference == "source_amateur" else f"{self.method}:{reference}"


class TrainConfig(Section):
    # where and how training runs: the same adapter whatever they are (kept out of fingerprints)
    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = (
        "workers", "use_gpu", "cpus_per_worker", "deepspeed_stage", "deepspeed_config", "gradient_checkpointing",
        "offload_optimizer", "offload_params", "checkpoint_every_steps", "max_failures", "gather_base_for_answers")

    lora: LoraShape = Field(default_factory=LoraShape)
    workers: int = Field(2, ge=1, description="Ray Train workers (one process, and GPU if use_gpu, each)")
    use_gpu: bool = Field(False, description="train on GPUs (one per worker)")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores each Ray Train worker reserves")
    deepspeed_stage: Literal[2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 2 (optimizer and gradients partitioned) or 3 (parameters too; the "
        "target is built partitioned, never whole in one process: large targets)")
    deepspeed_config: str | None = Field(
        None, description="your DeepSpeed JSON (start from titok/train/deepspeed/zero{2,3}.json); its 'auto' fields "
        "and the offload sections are filled from this config")
    max_length: int | None = Field(
        None, ge=16, description="max prompt+response tokens of a training example on the trained model's tokenizer "
        "(default: engine.max_length in a transplant, 512 in titok sft)")
    epochs: int = Field(2, ge=1, description="passes over the selected data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps in all (overrides epochs when set)")
    global_batch_size: int = Field(
        8, ge=1, description="samples per optimizer step over all workers: the recipe, the same for 1 or 16 "
        "workers (gradient accumulation = global_batch_size / (workers x micro-batch))")
    micro_batch_size: int = Field(
        4, ge=1, description="most samples per worker per forward pass (the largest divisor of "
        "global_batch_size / workers up to this is used)")
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate (unless lr_search picks one)")
    validation_fraction: float = Field(
        0.0, ge=0.0, le=0.5, description="share of the training samples held out of training (a seeded draw): the "
        "adapter's loss on their kept tokens is measured after every epoch (val_loss in the train metrics)")
    lr_search: list[float] = Field(
        [], description="learning rates to try, each training its own LoRA on the same rows; the run keeps the one "
        "with the lowest final validation loss (needs validation_fraction > 0; costs one training per rate; each rate "
        "trained is kept in the run dir, so a rerun that adds rates trains only the new ones)")
    validation_generations: int = Field(
        32, ge=0, description="held-out samples whose queries the trained LoRA answers (greedy, after the last "
        "step) to check that its answers end: the end-of-turn token within twice the expert's response + 16 tokens "
        "(val_answers_end in the train metrics); under lr_search a rate whose answers end on over 10 points fewer "
        "of them than another rate's cannot win, since the validation loss does not see a LoRA that loops; nor can a rate "
        "that gives one answer to >= 90% of them where the expert's answers to the same queries are more varied, while "
        "another rate's are (val_answers_top, val_answers_top_share, val_answers_collapsed). 0: off")
    gather_base_for_answers: Literal["auto", "never"] = Field(
        "auto", description="ZeRO-3: for the held-out answers (validation_generations) each rank gathers the whole "
        "target base once per rate and answers its share of the queries, instead of all ranks gathering it at every "
        "decode step in step; auto = where the base takes at most half of every rank's free memory (not a 70B target "
        "on 80 GB GPUs); never = always per step. The same answers either way")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="linear warm-up share of all steps")
    max_grad_norm: float = Field(0.3, gt=0.0, description="gradient clipping")
    normalization: Normalization = Field("selected_mean", description="selective-loss normalization")
    distill_weight: float = Field(1.0, ge=0.0, description="weight of the ULD distance next to the cross-entropy "
                                  "(filter.method=uld only; ULD's and TRL GOLD's default)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training dtype of the target base; auto = bf16 on CUDA GPUs with bf16, fp32 on CPUs "
        "(bf16 backward is slower there; titok.hardware)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations in the backward pass (less memory, ~30% more compute); "
        "auto = on for targets of 1B parameters or more")
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (DeepSpeed CPU Adam)")
    offload_params: bool = Field(False, description="keep the base's parameter shards in CPU memory (ZeRO-3 only)")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint every N optimizer steps (always at each epoch's end); a run "
        "whose worker died resumes from the last checkpoint")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint before the run fails")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.global_batch_size % self.workers:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of workers={self.workers}")
        if self.offload_params and self.deepspeed_stage != 3:
            raise ValueError("offload_params needs deepspeed_stage=3 (only ZeRO-3 partitions parameters)")
        if self.lr_search and not self.validation_fraction:
            raise ValueError("lr_search needs validation_fraction > 0: the rates are compared on held-out samples")
        if any(lr <= 0 for lr in self.lr_search) or len(set(self.lr_search)) != len(self.lr_search):
            raise ValueError(f"lr_search={self.lr_search}: learning rates must be positive and listed once")
        if self.deepspeed_config and not Path(self.deepspeed_config).is_file():
            raise ValueError(f"deepspeed_config: {self.deepspeed_config} does not exist")
        return self


class ClusterConfig(Section):
    """How long the driver waits for the cluster: when, never what (kept out of fingerprints)."""

    wait_for_resources_s: float = Field(
        600.0, ge=0.0, description="seconds the driver waits for the GPUs of the largest stage to register (an "
        "autoscaling or slowly starting cluster; the autoscaler is asked for them) before it checks the plan")
    gpu_release_timeout_s: float = Field(
        300.0, ge=0.0, description="seconds the driver waits, after the engines shut down, until each GPU they used has "
        "the memory the next stage needs free (NVML); then it stops naming the GPU and what holds it. 0 = no check")


class EvalSettings(Section):
    """Held-out evaluation (``titok compare``'s table, ``titok migrate``'s release gate)."""

    # where it runs, not what it measures (kept out of cache keys)
    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = ("cpus_per_actor", "gpus_per_actor")

    examples: int = Field(50, ge=1, le=HELD_OUT_EXAMPLES, description=(
        f"held-out examples per task (the same ones for every row); at most {HELD_OUT_EXAMPLES}, the held-out "
        "split: more would include examples a source expert trains on"))
    max_new_tokens: int | None = Field(
        None, ge=1, description="greedy answer budget (default: 1.25 x the longest reference response + 8 tokens)")
    batch_size: int = Field(16, ge=1, description="examples per generation batch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="inference dtype; auto = bf16 where the device runs it fast, else fp32")
    cpus_per_actor: int = Field(1, ge=1, description="CPU cores (torch threads) per evaluation actor")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per evaluation actor (0 = CPU)")
    engine: EngineName | None = Field(
        None, description="engine that answers and scores options: transformers, or vllm (each adapter a LoRA request, "
        "one GPU per actor); none: the runs' own engine.name (compare, migrate), transformers for titok eval")


class EvalConfig(EvalSettings):
    """``titok eval``: one base model (+ one adapter) on a task's held-out examples."""

    base: str = Field(..., description="base model: short name, .gguf file, HF folder or hub id")
    adapter: str | None = Field(None, description="PEFT adapter folder (none: the vanilla base)")
    task: str = Field("boolean_expressions", description="built-in task name or a BBH-format JSON file")
    split_seed: int = Field(0, description="seed of the task's train/test split (a transplant's split_seed)")
    examples: int = Field(100, ge=1, le=HELD_OUT_EXAMPLES, description=(
        f"held-out examples to score; at most {HELD_OUT_EXAMPLES}, the held-out split"))
    out: OutputPath | None = Field(None, description="write the full report (with every prediction) as JSON here")
    harness: list[str] = Field([], description="lm-evaluation-harness tasks to run on the same base + adapter too "
                               "(its HF backend, the adapter's chat template), up to `examples` documents each; results "
                               "in <out>.lm-eval.json")
    harness_include: str | None = Field(None, description="a folder of your own lm-eval task YAML files")


class TransplantConfig(Section):
    source_base: str = Field(..., description="source base model: short name, .gguf file, HF folder or hub id")
    source_adapter: str = Field(..., description="folder of the source PEFT LoRA trained on source_base")
    target_base: str = Field(..., description="target base model (same forms as source_base)")
    task: str = Field(..., description="built-in task name (boolean_expressions) or a BBH-format JSON file")
    run_dir: OutputPath = Field("runs/transplant", validate_default=True,
                                description="stage outputs, checkpoints and the final adapter go here")
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
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _pool_holds_m(self) -> "TransplantConfig":
        if self.queries.pool_size is not None and self.filter.top_m > self.queries.pool_size:
            raise ValueError(
                f"filter.top_m={self.filter.top_m} is larger than queries.pool_size={self.queries.pool_size}"
            )
        if FILTER_METHODS[self.filter.method].distills and not self.labels.top_logprobs:
            raise ValueError(f"filter.method={self.filter.method} distills the expert's top-n log-probs: set "
                             "labels.top_logprobs above 0 (e.g. 20)")
        from titok.core.validation_split import validation_count

        held_out = validation_count(self.filter.top_m, self.train.validation_fraction)
        if self.train.global_batch_size > self.filter.top_m - held_out:
            after = f" less the {held_out} train.validation_fraction holds out" if held_out else ""
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} is larger than "
                             f"filter.top_m={self.filter.top_m}{after}, the samples there are to train on")
        return self

    @property
    def pool_size(self) -> int:
        """Synthetic queries to collect: ``queries.pool_size``, by default twice ``filter.top_m``."""
        return self.queries.pool_size or 2 * self.filter.top_m

    @property
    def train_max_length(self) -> int:
        """Tokens of a training example: ``train.max_length``, by default the length the engines score."""
        return self.train.max_length or self.engine.max_length


class TransplantSettings(Section):
    """Transplant fields that a compare or a zoo sets for many runs at once (``compare.transplant``,
    ``zoo.defaults``, a zoo adapter's ``overrides``); the per-run fields (bases, adapter, task,
    run_dir) come from the compare grid or the manifest. Each section is checked when the file is
    read; how sections combine (top_m against the pool, ...) is checked per run, in TransplantConfig.
    ``fields()`` is only what was set, so every unset field keeps the run's own default."""

    seed: int = TransplantConfig.model_fields["seed"]
    split_seed: int = TransplantConfig.model_fields["split_seed"]
    trust_remote_code: bool = TransplantConfig.model_fields["trust_remote_code"]
    engine: EngineConfig = Field(default_factory=EngineConfig)
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    def fields(self) -> dict:
        return self.model_dump(exclude_unset=True)


def merged_fields(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section (a zoo adapter's overrides over the defaults, a compare
    task's ``per_task`` fields over ``transplant``): a field set in ``extra`` wins, the rest of its section stays."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged_fields(out[key], value) if nested else value
    return out


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
        if not key.strip() or any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: no field name before '=' (give --set section.field=value)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key.strip()}: {raw!r} is not a YAML value") from None
        _set_dotted(data, key.strip(), value)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the
    last silently, and a config whose first value is the one read is the one a person checked."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is set twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path | None, overrides: list[str] = (), **fields: Any) -> dict:
    """A YAML mapping (optional) with keyword fields and ``--set`` overrides applied, not yet validated."""
    data: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
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


# A source expert should learn its task quickly: a larger rank, all attention projections, higher lr.
SFT_DEFAULTS = {"lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "lr": 1e-3, "epochs": 2, "max_grad_norm": 1.0, "max_length": 512}


def sft_train_config(settings: dict | None = None, overrides: list[str] = (), what: str = "sft training") -> TrainConfig:
    """``SFT_DEFAULTS`` under a YAML section (``settings``, e.g. compare's ``source.train``) and
    ``--set`` strings, validated; the defaults themselves are never changed."""
    data = copy.deepcopy(SFT_DEFAULTS)
    for key, value in (settings or {}).items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return validated(TrainConfig, apply_overrides(data, list(overrides)), what)


METHODS = tuple(FILTER_METHODS)
_PER_CELL_FIELDS = ("source_base", "source_adapter", "target_base", "task", "run_dir", "seed", "split_seed")


class SourceSettings(Section):
    adapters: dict[str, str] = Field(
        {}, description="task -> an existing source LoRA on source_base; tasks without one get `titok sft`")
    train_examples: int = Field(256, ge=1, description="training examples for a `titok sft` source expert")
    train: TrainConfig = Field(default_factory=TrainConfig, description="titok sft training: the fields set here "
                               "override titok sft's defaults (epochs, lr, lora.rank, ...); the rest keep them")

    def sft_train(self) -> TrainConfig:
        return sft_train_config(self.train.model_dump(exclude_unset=True), what="compare source.train")


class CompareConfig(Section):
    source_base: str = Field(..., description="the source base model every source expert is trained on")
    targets: list[str] = Field(..., min_length=1, description="target bases (same or other tokenizer)")
    tasks: list[str] = Field(..., min_length=1, description="built-in task names or task files")
    methods: list[str] = Field(
        list(METHODS), min_length=1, description="trained rows of the table (vanilla is always evaluated): a filter "
        f"method {list(METHODS)}, optionally with its token reference, method:reference ({list(REFERENCES)}), e.g. "
        "titok:target_base")
    budget: Literal["epochs", "steps", "both"] = Field(
        "epochs", description="training budget of every method: train.epochs each (methods on fewer samples take "
        "fewer steps), the same number of optimizer steps each (steps), or both side by side")
    steps: int | None = Field(
        None, ge=1, description="optimizer steps under budget steps (default: what kd, on the whole pool, takes in "
        "train.epochs epochs)")
    seeds: int | list[int] = Field(
        3, description="transplant seeds (queries, sampling, filters, init): N runs seeds 0..N-1; a list runs those "
        "seeds, so a later invocation or another job adds seeds to the same out_dir ([1, 2])")
    split_seed: int = Field(0, description="seed of every task's seed/train/test split, the same for all rows")
    out_dir: OutputPath = Field("runs/compare", validate_default=True, description="runs, evaluations and the report go here")
    source: SourceSettings = Field(default_factory=SourceSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    transplant: TransplantSettings = Field(
        default_factory=TransplantSettings, description="transplant sections shared by every run: engine, queries, "
        "labels, filter (not method), train, trust_remote_code")
    per_task: dict[str, TransplantSettings] = Field(
        {}, description="task -> transplant fields for that task's runs only, over transplant (a task with longer "
        "questions: {queries: {max_new_tokens: 160}}); every method and target of the task gets them")

    @field_validator("methods")
    @classmethod
    def _known_variants(cls, values: list) -> list:
        for value in values:
            method, _, reference = value.partition(":")
            if method not in METHODS or (reference and reference not in REFERENCES):
                raise ValueError(f"{value!r} is not a method {list(METHODS)} or method:reference {list(REFERENCES)}")
        return values

    @field_validator("methods", "targets", "tasks")
    @classmethod
    def _unique(cls, values: list) -> list:
        return _listed_once(values)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} seeds: run at least 1 (or list the seeds, e.g. [1, 2])")
        if isinstance(value, list):
            if not value or min(value) < 0:
                raise ValueError(f"{value}: list one or more seeds, each >= 0")
            _listed_once(value)
        return value

    @property
    def seed_list(self) -> list[int]:
        """The seeds this invocation runs, in order."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @field_validator("transplant", mode="before")
    @classmethod
    def _no_per_run_fields(cls, values):
        return _without_per_cell_fields(values)

    @field_validator("per_task", mode="before")
    @classmethod
    def _no_per_run_fields_per_task(cls, values):
        for task, fields in values.items() if isinstance(values, dict) else ():
            try:
                _without_per_cell_fields(fields)
            except ValueError as err:
                raise ValueError(f"{task}: {err}") from None
        return values

    @model_validator(mode="after")
    def _per_task_names_listed_tasks(self) -> "CompareConfig":
        unknown = sorted(set(self.per_task) - set(self.tasks))
        if unknown:
            raise ValueError(f"per_task: {unknown} are not among tasks {self.tasks}")
        return self

    def task_settings(self, task: str) -> dict:
        """The transplant fields every run of ``task`` gets: ``transplant``, with ``per_task[task]`` over it."""
        extra = self.per_task.get(task)
        return merged_fields(self.transplant.fields(), extra.fields() if extra else {})


def _listed_once(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"listed twice: {sorted({v for v in values if values.count(v) > 1})}")
    return values


def _without_per_cell_fields(values):
    if not isinstance(values, dict):
        return values
    clashes = [k for k in values if k in _PER_CELL_FIELDS]
    if clashes:
        raise ValueError(f"{clashes} are set per run by compare (use tasks/targets/seeds/source)")
    if isinstance(values.get("filter"), dict) and {"method", "reference"} & set(values["filter"]):
        raise ValueError("filter.method and filter.reference are set per run by compare (use methods)")
    return values


def load_compare_config(path: str | None, overrides: list[str] = (), seeds: int | None = None) -> CompareConfig:
    data = read_yaml(path, overrides)
    if seeds is not None:
        data["seeds"] = seeds
    return validated(CompareConfig, data, "compare")
