"""Pre-flight checks that open what they check, collected instead of raised one at a time.

An adapter is checked the way PEFT would load it, but in milliseconds and before Ray starts: its
``adapter_config.json`` parses, its weights are safetensors (never pickle) whose header opens, every
tensor is a ``lora_A``/``lora_B`` of a projection the base model has, with the base's dimensions and
the adapter's rank, and it was trained on the base it is given for. Each problem is one line that
names the field or file; callers report them all at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["adapter_config_problems", "adapter_problems", "adapter_weight_problems"]

_LORA_KEY = re.compile(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _read_adapter_config(field: str, folder: Path) -> tuple[dict | None, list[str]]:
    path = folder / "adapter_config.json"
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
    if trained_on and trained_on not in {base, base_path}:
        problems.append(f"{field}: {folder} was trained on {trained_on!r}, not on {base!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        shape = model_shape(base, trust_remote_code)
        missing = sorted(set(targets) - set(shape.linear_dims))
        if missing:
            problems.append(f"{field}: target_modules {missing} are not projections of {base} "
                            f"(it has {sorted(shape.linear_dims)})")
    return problems


def adapter_weight_problems(field: str, folder: str | Path, base: str, trust_remote_code: bool = False) -> list[str]:
    """What the adapter's weights are: safetensors (never pickle) that open, with the base's shapes."""
    from safetensors import safe_open

    from titok.model_shape import model_shape

    folder = Path(folder)
    config, problems = _read_adapter_config(field, folder)
    if config is None:
        return problems
    weights = folder / "adapter_model.safetensors"
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
    return []
