"""The transplant's product: a stock PEFT folder for the target base, safetensors only, with a card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from titok.models import resolve_model_path

__all__ = ["export_adapter"]


def export_adapter(checkpoint_dir: str | Path, out_dir: str | Path, target_base: str, card: dict) -> Path:
    """Copy the trained adapter, point it at a loadable target base, and write README.md.

    Built in a staging folder and swapped in whole: until the new adapter is complete, the old one
    (if any) stays where it was."""
    final = Path(out_dir)
    out_dir = final.with_name(f".{final.name}.partial")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(Path(checkpoint_dir) / name, out_dir / name)
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = resolve_model_path(target_base)
    config_path.write_text(json.dumps(adapter_config, indent=2))
    (out_dir / "titok.json").write_text(json.dumps(card, indent=2, default=str))
    rows = "\n".join(f"| {key} | {value} |" for key, value in card.items())
    (out_dir / "README.md").write_text(
        "---\nlibrary_name: peft\n---\n# LoRA transplanted with titok (TiTok)\n\n"
        f"Base model: `{adapter_config['base_model_name_or_path']}`\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({adapter_config['base_model_name_or_path']!r}), {str(final)!r})\n```\n\n"
        f"| field | value |\n|---|---|\n{rows}\n"
    )
    previous = final.with_name(f".{final.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    out_dir.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final
