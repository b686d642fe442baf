"""The exported adapter is portable: moved to another machine (another HOME, the base in that
machine's Hugging Face cache) stock PEFT loads it on the base it names, and no file in it holds a
path of the machine that made it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from titok.export import CHAT_TEMPLATE_FILE, export_adapter
from titok.models import HUB_IDS, PLAIN_CHAT_TEMPLATE, cache_dir, hub_id, resolve_model_path
from titok.validate import adapter_config_problems

_CARD = {"kind": "transplant", "source_base": "smollm2-135m", "source_adapter": "/home/alice/adapters/bool-lora",
         "target_base": None, "task": "boolean_expressions", "method": "titok", "top_m": 6, "k": 0.7,
         "pool_size": 12, "train_rows": 6, "train_metrics": {"loss": 1.25}}


def _hub_snapshot(cache: Path, repo: str, model_dir: str) -> Path:
    """``model_dir`` laid out as the Hugging Face hub cache keeps ``repo`` (what a download leaves)."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    return snapshot


def _trained_checkpoint(base_dir: str, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)  # PEFT writes the base's absolute path, as a trained checkpoint has it
    return folder


def test_an_exported_adapter_loads_on_another_machine_from_the_base_it_names(tiny_model_dirs, tmp_path):
    here = tmp_path / "here" / ".cache" / "huggingface" / "hub"
    base = _hub_snapshot(here, "titok-test/tiny-gemma", tiny_model_dirs["target"])
    checkpoint = _trained_checkpoint(str(base), tmp_path / "checkpoint")
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    adapter = export_adapter(checkpoint, tmp_path / "runs" / "adapter", str(base), {**_CARD, "target_base": str(base)})

    # another machine: another HOME, the base in its own hub cache, this machine's folders gone
    there = tmp_path / "there"
    _hub_snapshot(there / ".cache" / "huggingface" / "hub", "titok-test/tiny-gemma", tiny_model_dirs["target"])
    moved = shutil.move(str(adapter), there / "bool-lora")
    shutil.rmtree(tmp_path / "here"), shutil.rmtree(checkpoint)
    for file in Path(moved).iterdir():
        if file.name != "titok.json":  # titok.json keeps the local paths the run used, under "local", on purpose
            text = file.read_bytes().decode("utf-8", errors="ignore")
            assert str(tmp_path) not in text and "/home/" not in text, file.name
    config = json.loads(Path(moved, "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "titok-test/tiny-gemma"
    assert json.loads(Path(moved, "titok.json").read_text())["local"]["base_model_path"] == str(base)

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TITOK_"))},
           "HOME": str(there), "HF_HUB_OFFLINE": "1"}
    load = ("import sys, torch; from peft import AutoPeftModelForCausalLM\n"
            "model = AutoPeftModelForCausalLM.from_pretrained('bool-lora')\n"
            "assert any('lora_B' in n and p.abs().sum() > 0 for n, p in model.named_parameters())\n"
            "print(model.peft_config['default'].base_model_name_or_path, model.base_model.model.config.model_type)")
    done = subprocess.run([sys.executable, "-c", load], cwd=there, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["titok-test/tiny-gemma", "gemma3_text"]


def test_the_card_names_the_base_for_the_hub_and_ships_the_training_template(tiny_model_dirs, tmp_path):
    from huggingface_hub import ModelCard

    checkpoint = _trained_checkpoint(tiny_model_dirs["target"], tmp_path / "checkpoint")
    adapter = export_adapter(checkpoint, tmp_path / "adapter", tiny_model_dirs["target"],
                             {**_CARD, "target_base": tiny_model_dirs["target"]})
    card = ModelCard.load(adapter / "README.md")
    assert card.data.base_model == "target" and card.data.library_name == "peft"
    assert {"lora", "titok", "transplant", "boolean_expressions"} <= set(card.data.tags)
    assert "LoRA transplanted with titok (TiTok) onto target" in card.text
    assert "the `titok` filter kept 6 samples" in card.text and "bool-lora" in card.text
    assert (adapter / CHAT_TEMPLATE_FILE).read_text() == PLAIN_CHAT_TEMPLATE  # the tiny Gemma's tokenizer has none

    sft = export_adapter(checkpoint, tmp_path / "sft", tiny_model_dirs["target"],
                         {"kind": "sft", "base": tiny_model_dirs["target"], "task": "web_of_lies", "train_examples": 9})
    card = ModelCard.load(sft / "README.md")
    assert card.text.lstrip().startswith("# LoRA trained with titok sft on web_of_lies")
    assert "transplanted" not in card.text and "sft" in card.data.tags


def test_short_names_and_cache_folders_name_the_hub_model():
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("gemma3-270m") == "google/gemma-3-270m"
    assert hub_id(resolve_model_path("gemma3-270m")) == HUB_IDS["gemma3-270m"]
    assert hub_id("/home/bob/.cache/titok/models/smollm2-135m-0123456789ab") == HUB_IDS["smollm2-135m"]
    assert hub_id("meta-llama/Llama-3.3-70B-Instruct") == "meta-llama/Llama-3.3-70B-Instruct"
    assert hub_id("/data/hf/hub/models--meta-llama--Llama-3.3-70B-Instruct/snapshots/abc") == "meta-llama/Llama-3.3-70B-Instruct"
    assert hub_id("/mnt/weights/my-model") == "my-model"
    assert hub_id("/mnt/weights/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"


def test_an_adapter_made_under_another_users_home_is_accepted_for_its_short_name(tmp_path):
    """The refusal the issue reports: an older export named its base by the exporting user's model
    cache; the same model under its short name, or its hub id, is the same base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    assert cache_dir().exists()
    config = json.loads((Path(resolve_model_path("smollm2-135m")) / "config.json").read_text())
    tiny = LlamaConfig(**{**config, "num_hidden_layers": 1})
    adapter = get_peft_model(AutoModelForCausalLM.from_config(tiny), LoraConfig(r=4, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "theirs")
    for trained_on in ("/home/bob/.cache/titok/models/smollm2-135m-0123456789ab", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        path = tmp_path / "theirs" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": trained_on}))
        assert adapter_config_problems("source_adapter", tmp_path / "theirs", "smollm2-135m") == []
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": "google/gemma-3-270m"}))
    assert "was trained on 'google/gemma-3-270m', not on 'smollm2-135m'" in \
        adapter_config_problems("source_adapter", tmp_path / "theirs", "smollm2-135m")[0]
