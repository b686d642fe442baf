"""transformers engine: the embedded default, CPU or GPU.

On GPUs the model is split over every GPU the actor holds (``device_map="auto"``: whole layers per
GPU, filled in order), so a model larger than one GPU runs in one actor without tensor parallelism.
"""

from __future__ import annotations

import contextlib

import torch
from peft import PeftModel

from titok.engines.base import GenerationParams, InferenceEngine, named_adapters
from titok.excess import TokenScores, score_pairs
from titok.hardware import resolve_dtype
from titok.models import format_prompt, load_model, load_tokenizer

__all__ = ["TransformersEngine"]


class TransformersEngine(InferenceEngine):
    def __init__(self, base: str, adapter: str | dict[str, str] | None, dtype: str = "auto", max_length: int = 512,
                 batch_size: int = 8, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(base, trust_remote_code)
        self.tokenizer.padding_side = "left"  # generation continues at the right edge
        self.dtype_choice = resolve_dtype(dtype)
        gpus = torch.cuda.device_count()  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPUs
        device_map = "auto" if gpus > 1 else ("cuda" if gpus == 1 else None)
        model = load_model(base, getattr(torch, self.dtype_choice[0]), trust_remote_code, device_map=device_map)
        self.model = model
        self.load_adapters(named_adapters(adapter))
        self.max_length = max_length
        self.batch_size = batch_size

    def load_adapters(self, adapters: dict[str, str]) -> None:
        """More named adapters on the same base copy (``set_adapter(name)`` picks one): evaluating
        several adapters of one base loads the base once."""
        for name, path in adapters.items():
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()

    def select_adapter(self, name: str) -> None:
        self.model.set_adapter(name)

    def adapter_context(self, use_adapter: bool):
        """The active adapter on (``use_adapter``) or off (the bare base) for the calls inside."""
        if use_adapter and not isinstance(self.model, PeftModel):
            raise ValueError("this engine has no adapter loaded")
        return contextlib.nullcontext() if use_adapter or not isinstance(self.model, PeftModel) else self.model.disable_adapter()

    @torch.no_grad()
    def generate(self, messages: list[str], params: GenerationParams, use_adapter: bool, chat: bool = True) -> list[str]:
        device = self.model.get_input_embeddings().weight.device  # where inputs go under a device_map
        prompts = [format_prompt(self.tokenizer, m) for m in messages] if chat else list(messages)
        outputs: list[str] = []
        torch.manual_seed(params.seed)
        for start in range(0, len(prompts), self.batch_size):
            # chat prompts carry their own BOS (the template); raw prompts get the tokenizer's
            enc = self.tokenizer(prompts[start : start + self.batch_size], add_special_tokens=not chat,
                                 padding=True, return_tensors="pt").to(device)
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} \
                if params.temperature > 0 else {"do_sample": False}
            with self.adapter_context(use_adapter):
                out = self.model.generate(**enc, max_new_tokens=params.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return [text.strip() for text in outputs]

    def score(self, queries: list[str], responses: list[str]) -> list[TokenScores]:
        return score_pairs(self.model, self.tokenizer, queries, responses, self.batch_size, "left", self.max_length)
