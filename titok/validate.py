"""Pre-flight checks that open what they check, collected instead of raised one at a time.

An adapter is checked the way PEFT would load it, but in milliseconds and before Ray starts: its
``adapter_config.json`` parses, its weights are safetensors (never pickle) whose header opens, every
tensor is a ``lora_A``/``lora_B`` of a projection the base model has, with the base's dimensions and
the adapter's rank, and it was trained on the base it is given for. Each problem is one line that
names the field or file; callers report them all at once.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from titok.config import ConfigError
from titok.runstate import ADAPTER_CARD, ADAPTER_CONFIG, ADAPTER_WEIGHTS, COMPLETE, LEGACY_EVENTS, RUN_MANIFEST, STARTED

__all__ = [
    "adapter_config_problems", "adapter_problems", "adapter_weight_problems", "check_eval", "check_model", "check_sft",
    "check_task", "gpu_problems", "model_problems", "task_problems", "transplant_problems", "validate_inputs",
    "writable_problems",
]

_LORA_KEY = re.compile(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _read_adapter_config(field: str, folder: Path) -> tuple[dict | None, list[str]]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return None, [f"{field}: {folder} has no adapter_config.json (not a PEFT adapter folder)"]
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{field}: {path} is not valid JSON ({err})"]
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        return None, [f"{field}: {path} has no integer LoRA rank 'r'"]
    return config, []


def adapter_problems(field: str, folder: str | Path, base: str, base_path: str | None = None,
                     trust_remote_code: bool = False) -> list[str]:
    """Every problem with the adapter in ``folder`` for base model ``base`` (empty: it will load)."""
    problems = adapter_config_problems(field, folder, base, base_path, trust_remote_code)
    return problems or adapter_weight_problems(field, folder, base, trust_remote_code)


def adapter_config_problems(field: str, folder: str | Path, base: str, base_path: str | None = None,
                            trust_remote_code: bool = False) -> list[str]:
    """What the adapter claims: a PEFT folder, trained on ``base``, targeting projections ``base`` has."""
    from titok.model_shape import model_shape

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{field}: {folder} does not exist"]
    config, problems = _read_adapter_config(field, folder)
    if config is None:
        return problems
    trained_on = config.get("base_model_name_or_path")
    if trained_on and not _same_base(trained_on, base, base_path, trust_remote_code):
        problems.append(f"{field}: {folder} was trained on {trained_on!r}, not on {base!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        shape = model_shape(base, trust_remote_code)
        missing = sorted(set(targets) - set(shape.linear_dims))
        if missing:
            problems.append(f"{field}: target_modules {missing} are not projections of {base} "
                            f"(it has {sorted(shape.linear_dims)})")
    return problems


def _same_base(trained_on: str, base: str, base_path: str | None, trust_remote_code: bool) -> bool:
    """An adapter names its base by hub id (titok's own exports), by the spec or path it was given, or
    (older titok) by a model-cache folder in someone's home: each names ``base`` if it is that model."""
    from titok.models import hub_id

    if trained_on in {base, base_path}:
        return True
    name = hub_id(base, trust_remote_code)
    # two local folders that share only a folder name are not one model; two names of one hub model are
    return trained_on == name or ("/" in name and hub_id(trained_on, trust_remote_code) == name)


def adapter_weight_problems(field: str, folder: str | Path, base: str, trust_remote_code: bool = False) -> list[str]:
    """What the adapter's weights are: safetensors (never pickle) that open, with the base's shapes."""
    from safetensors import safe_open

    from titok.model_shape import model_shape

    folder = Path(folder)
    config, problems = _read_adapter_config(field, folder)
    if config is None:
        return problems
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        return [f"{field}: {folder} has " + ("only adapter_model.bin (pickle), which titok never loads; re-save it "
                                             "with safe_serialization=True" if pickled else "no adapter_model.safetensors")]
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for a torn or foreign file
        return [f"{field}: {weights} cannot be read as safetensors ({type(err).__name__}: {err})"]
    if not shapes:
        return [f"{field}: {weights} holds no tensors"]
    shape = model_shape(base, trust_remote_code)
    rank, ranks = config["r"], config.get("rank_pattern") or {}
    for key, dims in shapes.items():
        match = _LORA_KEY.search(key)
        if not match:
            continue  # modules_to_save and other extras: PEFT loads them as they are
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if module not in shape.linear_dims or layer >= shape.layers:
            return [f"{field}: tensor {key} has no place in {base} ({shape.layers} layers, projections "
                    f"{sorted(shape.linear_dims)})"]
        r = next((v for pattern, v in ranks.items() if re.search(pattern, key)), rank)
        fan_in, fan_out = shape.linear_dims[module]
        expected = (r, fan_in) if side == "A" else (fan_out, r)
        if dims != expected:
            return [f"{field}: tensor {key} has shape {list(dims)}, but {base}'s {module} with rank {r} "
                    f"needs {list(expected)}"]
    return _finite_problems(field, weights)


def _finite_problems(field: str, weights: Path) -> list[str]:
    """Every weight a finite number: a LoRA with NaN or inf (a diverged training) loads and then
    poisons every log-prob the expert gives."""
    import torch
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                return [f"{field}: tensor {key} in {weights} has {bad} of {tensor.numel()} values NaN or inf "
                        "(a training that diverged?)"]
    return []


def model_problems(field: str, spec: str, trust_remote_code: bool = False, need_weights: bool = True) -> list[str]:
    """A model resolves, its config loads and (for a local folder) its safetensors weights are all
    there and open; hub ids are checked by their config only (the weights download later)."""
    from transformers import AutoConfig

    from titok.models import resolve_model_path

    try:
        resolved = resolve_model_path(spec)
    except FileNotFoundError as err:
        return [f"{field}: {err}"]
    folder = Path(resolved)
    if folder.exists():
        if not folder.is_dir():
            return [f"{field}: {folder} is a file, not a model folder"]
        if not (folder / "config.json").is_file():
            return [f"{field}: {folder} has no config.json (not a model folder)"]
    try:
        AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        return [f"{field}: cannot load the model config of {spec!r}: {str(err).splitlines()[0]}"]
    if not (folder.exists() and need_weights):
        return []
    return _weight_problems(field, folder)


def _weight_problems(field: str, folder: Path) -> list[str]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            return [f"{field}: {index} is not a valid weight index ({err})"]
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        return [f"{field}: {folder} has " + (f"only pickle weights {pickled}, which titok never loads; convert them to "
                                             "safetensors" if pickled else "a config but no weights (titok plan works "
                                             "from a config alone; a transplant needs the weights)")]
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            return [f"{field}: weight shard {path} is missing"]
        try:
            with safe_open(str(path), framework="pt") as f:
                next(iter(f.keys()), None)
        except Exception as err:  # torn or foreign file
            return [f"{field}: {path} cannot be read as safetensors ({type(err).__name__}: {err})"]
    return []


def task_problems(field: str, spec: str, split_seed: int, few_shot: int | None = None, min_test: int = 0):
    """``(task or None, problems)``: the task loads (parsed, deduplicated, targets present)."""
    from titok.tasks import load_task

    try:
        task = load_task(spec, seed=split_seed)
    except ValueError as err:
        return None, [f"{field}: {err}"]
    problems = []
    if few_shot is not None and len(task.seed_examples) < few_shot:
        problems.append(f"queries.few_shot={few_shot} but task {spec!r} has only {len(task.seed_examples)} seed examples")
    if len(task.test_examples) < min_test:
        problems.append(f"{field}: task {spec!r} has {len(task.test_examples)} held-out examples, {min_test} were asked for")
    return task, problems


@functools.lru_cache(maxsize=64)
def template_tokens(spec: str, trust_remote_code: bool = False) -> int:
    """Tokens of the chat template around an empty user message (what every prompt costs)."""
    from titok.models import load_tokenizer
    from titok.core.sequences import encode_prompt

    tokenizer = load_tokenizer(spec, trust_remote_code)
    return len(encode_prompt(tokenizer, ""))


def length_problems(cfg) -> list[str]:
    """The chat template plus the longest synthetic query must leave room for a response in
    ``engine.max_length`` on both tokenizers and in the training length on the target's (else scoring
    or training cuts every response to nothing)."""
    problems = []
    limits = [("source_base", "engine.max_length", cfg.engine.max_length),
              ("target_base", "engine.max_length", cfg.engine.max_length)]
    if cfg.train.max_length is not None:
        limits.append(("target_base", "train.max_length", cfg.train.max_length))
    for field, setting, limit in limits:
        template = template_tokens(getattr(cfg, field), cfg.trust_remote_code)
        needed = template + cfg.queries.max_new_tokens + 1
        if needed > limit:
            problems.append(f"{setting}={limit} is shorter than {field}'s chat template "
                            f"({template} tokens) + a query (queries.max_new_tokens={cfg.queries.max_new_tokens}) + one "
                            f"response token = {needed}")
    return problems


def is_titok_folder(folder: Path) -> bool:
    """A folder titok made: its run manifest, or (runs from before the manifest) titok's own files."""
    if (folder / RUN_MANIFEST).is_file() or (folder / LEGACY_EVENTS).is_file():
        return True
    return any((child / COMPLETE).is_file() or (child / STARTED).is_file()
               for child in folder.iterdir() if child.is_dir())


def run_dir_problems(field: str, path: str | Path) -> list[str]:
    """A run directory titok may write into: new, empty, or one of titok's own (never a user's folder)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return [f"{field}: {folder} is a file"]
    if folder.is_dir() and any(folder.iterdir()) and not is_titok_folder(folder):
        return [f"{field}: {folder} holds files titok did not write; titok clears stage folders in its run "
                "directories, so it only uses a new or empty folder (or one of its own runs)"]
    return writable_problems(field, folder)


def writable_problems(field: str, folder: Path) -> list[str]:
    """``folder`` can be made and written: tried in it, or in its nearest existing parent (a probe
    folder made and removed at once; permission bits alone do not tell, root and ACLs aside)."""
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".titok-write-check-").cleanup()
    except OSError as err:
        return [f"{field}: {folder} cannot be written ({existing}: {err.strerror or err})"]
    return []


def transplant_problems(cfg) -> list[str]:
    """Everything a transplant config needs that the file system and the models can tell, at once."""
    from titok.models import resolve_model_path

    problems = run_dir_problems("run_dir", cfg.run_dir)
    for field in ("source_base", "target_base"):
        problems += model_problems(field, getattr(cfg, field), cfg.trust_remote_code)
    if problems:
        return problems  # the checks below need the models
    problems += adapter_problems("source_adapter", cfg.source_adapter, cfg.source_base,
                                 resolve_model_path(cfg.source_base), cfg.trust_remote_code)
    _, found = task_problems("task", cfg.task, cfg.split_seed, cfg.queries.few_shot)
    problems += found
    problems += length_problems(cfg)
    return problems


def validate_inputs(cfg) -> None:
    """Every check of a transplant that needs the file system, the models' configs or the task,
    before any model loads or Ray starts; all problems are reported together."""
    problems = transplant_problems(cfg) + gpu_problems(cfg)
    if problems:
        raise ConfigError("\n  ".join(["the transplant cannot start:", *problems]))


def gpu_problems(cfg) -> list[str]:
    """GPU settings on a machine without a GPU, where titok starts its own local Ray (no RAY_ADDRESS):
    no Ray node will ever have one, so the run would wait or fail after Ray starts."""
    import os

    if os.environ.get("RAY_ADDRESS"):
        return []  # a cluster: its nodes, not this machine, have the GPUs (the plan checks them)
    import torch

    if torch.cuda.device_count():
        return []
    asked = [f"engine.gpus_per_actor={cfg.engine.gpus_per_actor:g}"] if cfg.engine.gpus_per_actor else []
    asked += ["train.use_gpu=true"] if cfg.train.use_gpu else []
    return [f"{setting}: this machine has no GPU and titok starts a local Ray on it (for a GPU cluster, submit "
            "with `ray job submit` or set RAY_ADDRESS)" for setting in asked]


def check_model(field: str, spec: str, trust_remote_code: bool = False) -> None:
    """A model spec resolves, its config loads and a local folder's weights are all there (the
    first problem, as a ConfigError): a folder without a model or an unreachable hub id fails here,
    not in an actor."""
    problems = model_problems(field, spec, trust_remote_code)
    if problems:
        raise ConfigError(problems[0])


def check_task(field: str, spec: str, split_seed: int):
    """The task ``spec`` names, loaded; its first problem as a ConfigError."""
    task, problems = task_problems(field, spec, split_seed)
    if problems:
        raise ConfigError(problems[0])
    return task


def _raise_all(what: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n  ".join([f"{what} cannot start:", *problems]))


def check_eval(cfg) -> None:
    """``titok eval``'s inputs (an ``EvalConfig``), before Ray starts: the base, an adapter trained on
    it, the task."""
    from titok.models import resolve_model_path

    problems = model_problems("base", cfg.base)
    if cfg.adapter and not problems:
        problems += adapter_problems("adapter", cfg.adapter, cfg.base, resolve_model_path(cfg.base))
    problems += task_problems("task", cfg.task, cfg.split_seed)[1]
    if cfg.out and Path(cfg.out).is_dir():
        problems.append(f"out: {cfg.out} is a folder; the report is a JSON file (give e.g. {Path(cfg.out) / 'eval.json'})")
    elif cfg.out:
        problems += writable_problems("out", Path(cfg.out).parent)
    _raise_all("the evaluation", problems)


def check_sft(base: str, task: str, out: str, seed: int, max_length: int, target_modules: list[str] = ()) -> None:
    """``titok sft``'s inputs, before Ray starts: the base, the task, an output folder titok may fill,
    a max length the chat template leaves room in, and LoRA modules the base has."""
    out_path = Path(out)
    problems = model_problems("--base", base)
    if out_path.exists() and not out_path.is_dir():
        problems.append(f"--out: {out_path} is a file")
    elif out_path.is_dir() and any(out_path.iterdir()) and not (out_path / ADAPTER_CARD).is_file():
        problems.append(f"--out: {out_path} holds files titok did not write (a new adapter would replace them); "
                        "give a new or empty folder")
    problems += task_problems("--task", task, seed)[1]
    if not problems:
        from titok.model_shape import model_shape

        missing = sorted(set(target_modules) - set(model_shape(base).linear_dims))
        if missing:
            problems.append(f"lora.target_modules: {missing} are not projections of {base} "
                            f"(it has {sorted(model_shape(base).linear_dims)})")
        template = template_tokens(base)
        if template + 8 > max_length:
            problems.append(f"max_length={max_length} (--max-length) leaves no room for an example after the chat template "
                            f"({template} tokens)")
    _raise_all("titok sft", problems)
