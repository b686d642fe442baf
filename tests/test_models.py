from pathlib import Path

import pytest

from titok.models import PLAIN_CHAT_TEMPLATE, SHORT_NAMES, cache_dir, resolve_model_path
from titok.core.sequences import format_prompt


def test_short_names_resolve_to_cached_hf_folders():
    """A short name becomes a dequantized HF folder in the cache, converted once: resolving it again
    returns the same folder without writing its weights again (same file, same modification time)."""
    for name in SHORT_NAMES:
        path = Path(resolve_model_path(name))
        assert path.parent == cache_dir() / "models" and path.name.startswith(f"{name}-")
        weights = path / "model.safetensors"
        before = weights.stat()
        assert resolve_model_path(name) == str(path)
        after = weights.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_gguf_conversion_parses_the_file_once(monkeypatch):
    """transformers reads a GGUF file for the config, the weights and the tokenizer, each through a new
    ``gguf.GGUFReader``; inside ``_one_gguf_parse`` the second read reuses the first's parse."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from titok.models import _one_gguf_parse

    parses = []

    class CountedReader(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            parses.append(path)
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    path = str(SHORT_NAMES["smollm2-135m"][1]())
    with _one_gguf_parse():
        configs = [load_gguf_checkpoint(path, return_tensors=False)["config"] for _ in range(2)]
    assert configs[0] == configs[1] and configs[0]["model_type"] == "llama"
    assert parses == [path]
    assert gguf.GGUFReader is CountedReader  # put back as it was found


def test_hub_ids_and_folders_pass_through():
    assert resolve_model_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def test_smollm2_uses_its_own_chat_template(smollm2_tokenizer):
    prompt = format_prompt(smollm2_tokenizer, "What is 2+2?")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "What is 2+2?" in prompt
    assert smollm2_tokenizer.chat_template != PLAIN_CHAT_TEMPLATE


def test_gemma3_without_template_gets_the_plain_one(gemma3_tokenizer):
    assert gemma3_tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    prompt = format_prompt(gemma3_tokenizer, "What is 2+2?")
    assert prompt == "<bos>### Question:\nWhat is 2+2?\n\n### Answer:\n"


def test_real_models_load_and_predict(smollm2_model, smollm2_tokenizer):
    ids = smollm2_tokenizer(format_prompt(smollm2_tokenizer, "Say hello."), return_tensors="pt").input_ids
    logits = smollm2_model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(smollm2_tokenizer))
    assert not smollm2_model.training
