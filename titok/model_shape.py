"""A model's sizes from its ``config.json`` alone: built on the meta device, no weights read.

``titok plan`` and the pre-flight checks need parameter counts, the largest module, the KV-cache
bytes per token and LoRA sizes for models nobody has downloaded yet (a 70B target before the job
runs). transformers builds the real module tree on the meta device in about a second, so the
numbers come from the same classes that will load the weights, not from a per-family formula.
Parameters are counted by ``id()``: every meta tensor reports the same ``data_ptr()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LINEAR_MODULES", "ModelShape", "field_shape", "model_shape"]

# vLLM allocates each LoRA slot for every linear projection of the decoder, whatever the adapter targets
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int  # unique parameters (tied embeddings once)
    largest_module_params: int  # DeepSpeed's "largest layer": most direct parameters of one module
    layer_params: int  # one decoder layer
    embedding_params: int
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    linear_dims: dict  # module suffix -> (in_features, out_features) in one decoder layer

    @property
    def intermediate(self) -> int:
        """MLP width (the up projection's output; 4 x hidden where the names are unknown)."""
        return self.linear_dims.get("up_proj", (0, 4 * self.hidden))[1]

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Key + value cache of one token over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes

    def lora_params(self, rank: int, target_modules: list[str] | tuple[str, ...]) -> int:
        """Parameters of a LoRA of ``rank`` on the decoder projections named in ``target_modules``."""
        return self.layers * rank * sum(i + o for name, (i, o) in self.linear_dims.items() if name in target_modules)

    def lora_targets_missing(self, target_modules) -> list[str]:
        return [m for m in target_modules if m not in self.linear_dims]


def _dims(module: torch.nn.Module) -> tuple[int, int] | None:
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear) or (weight is not None and weight.dim() == 2 and hasattr(module, "in_features")):
        return int(module.in_features), int(module.out_features)
    return None


def field_shape(field: str, spec: str, trust_remote_code: bool = False) -> ModelShape:
    """``model_shape`` for the config field ``field``; a model whose config cannot be read (no hub
    connection, a gated or missing repo, a folder without config.json) is one line that names the
    field and the model and says what to do, instead of transformers' traceback."""
    from titok.config import ConfigError

    try:
        return model_shape(spec, trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = ("the folder has no readable config.json" if Path(spec).is_dir() else
                 "not reachable on the Hugging Face hub and not in its cache" if "connect" in reason else reason)
        hub = "" if Path(spec).is_dir() else ", or make the hub reachable (HF_TOKEN for gated models)"
        raise ConfigError(f"{field}: cannot read the config of {spec!r} ({where}). Point {field} at a local folder "
                          f"that holds its config.json (--set {field}=/path/to/folder: the plan needs only "
                          f"config.json){hub}") from None


@functools.lru_cache(maxsize=32)
def model_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """Shape of the model ``spec`` (short name, folder with a config.json, or hub id)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from titok.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(spec), trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    decoder_layers = next(m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList))
    layer = decoder_layers[0]
    linear_dims = {}
    for name, module in layer.named_modules():
        dims = _dims(module)
        if dims:
            linear_dims[name.rsplit(".", 1)[-1]] = dims
    embedding = model.get_input_embeddings().weight.numel()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=Path(spec).name if Path(spec).exists() else spec, params=sum(unique.values()), largest_module_params=largest,
        layer_params=sum(p.numel() for p in layer.parameters()), embedding_params=embedding, layers=len(decoder_layers),
        hidden=text.hidden_size, vocab=text.vocab_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim, linear_dims=linear_dims,
    )
