"""transformers engine: the embedded default, CPU or GPU.

On GPUs the model is split over every GPU the actor holds (``device_map="auto"``: whole layers per
GPU, filled in order), so a model larger than one GPU runs in one actor without tensor parallelism.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from peft import PeftModel

from titok.engines.base import GenerationParams, InferenceEngine, Label, named_adapters
from titok.core.excess import TokenScores, score_pairs, text_logprobs, token_logprobs, top_logprobs
from titok.hardware import resolve_dtype
from titok.models import load_model, load_tokenizer
from titok.core.sequences import format_prompt
from titok.models import stop_token_ids

__all__ = ["TransformersEngine"]


class _StepLogprobs:
    """While ``generate`` runs: the log-prob of each generated token under the model's raw logits
    (before temperature, top-p or any other processor), one step of logits held at a time.

    A hook on the LM head keeps the last position's logits of each step; the next step's forward
    receives the token chosen from them, and its log-prob is taken then (``output_logits`` would hold
    every step's full-vocabulary logits until the end instead). ``top_n``: each step's n likeliest
    log-probs too (``titok.core.distill``).
    """

    def __init__(self, model, top_n: int = 0):
        self.model, self.top_n, self.previous, self.steps, self.tops = model, top_n, None, [], []

    def _on_logits(self, module, inputs, output):
        self.previous = output[:, -1, :].float()
        if self.top_n:
            self.tops.append(top_logprobs(self.previous, self.top_n))

    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.previous is not None and ids is not None:
            self.steps.append(token_logprobs(self.previous, ids[:, -1]))

    def __enter__(self):
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        self.hooks = [base.get_output_embeddings().register_forward_hook(self._on_logits),
                      base.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probs of ``new_tokens``; the last step's token never fed a forward pass."""
        steps = self.steps + [token_logprobs(self.previous, new_tokens[:, -1])]
        return torch.stack(steps[-new_tokens.shape[1] :], dim=1).cpu()

    def finish_top(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, n) top-n log-probs of each step that chose one of ``new_tokens``."""
        return torch.stack(self.tops[-new_tokens.shape[1] :], dim=1).cpu()


class TransformersEngine(InferenceEngine):
    def __init__(self, base: str, adapter: str | dict[str, str] | None, dtype: str = "auto", max_length: int = 512,
                 batch_size: int = 8, trust_remote_code: bool = False, max_batch_tokens: int | None = None):
        self.tokenizer = load_tokenizer(base, trust_remote_code)
        self.tokenizer.padding_side = "left"  # generation continues at the right edge
        self.dtype_choice = resolve_dtype(dtype)
        gpus = torch.cuda.device_count()  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPUs
        device_map = "auto" if gpus > 1 else ("cuda" if gpus == 1 else None)
        model = load_model(base, getattr(torch, self.dtype_choice[0]), trust_remote_code, device_map=device_map)
        self.model = model
        self.load_adapters(named_adapters(adapter))
        self.max_length, self.batch_size, self.max_batch_tokens = max_length, batch_size, max_batch_tokens

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
    def _generate(self, prompts: list[str], params: GenerationParams, use_adapter: bool, chat: bool, logits: bool,
                  top_n: int = 0):
        """(new token ids per row, cut at the end of the answer; their raw log-probs or None; each step's
        top-n log-probs, (T, n), or None) per row."""
        device = self.model.get_input_embeddings().weight.device  # where inputs go under a device_map
        torch.manual_seed(params.seed)
        stop = set(stop_token_ids(self.model, self.tokenizer))
        for start in range(0, len(prompts), self.batch_size):
            # chat prompts carry their own BOS (the template); raw prompts get the tokenizer's
            enc = self.tokenizer(prompts[start : start + self.batch_size], add_special_tokens=not chat,
                                 padding=True, return_tensors="pt").to(device)
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} \
                if params.temperature > 0 else {"do_sample": False}
            recorder = _StepLogprobs(self.model, top_n) if logits else contextlib.nullcontext()
            with self.adapter_context(use_adapter), recorder:
                out = self.model.generate(**enc, max_new_tokens=params.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            steps = recorder.finish(new_tokens) if logits else None
            tops = recorder.finish_top(new_tokens) if logits and top_n else None
            for row, tokens in enumerate(new_tokens.tolist()):
                end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
                yield tokens[:end], (steps[row, :end].tolist() if logits else None), \
                    (tops[row, :end].numpy() if tops is not None else None)

    def generate(self, messages: list[str], params: GenerationParams, use_adapter: bool, chat: bool = True) -> list[str]:
        prompts = [format_prompt(self.tokenizer, m) for m in messages] if chat else list(messages)
        return [self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                for tokens, _, _ in self._generate(prompts, params, use_adapter, chat, logits=False)]

    def label(self, messages: list[str], params: GenerationParams, top_logprobs: int = 0) -> list[Label]:
        prompts = [format_prompt(self.tokenizer, m) for m in messages]
        labels = []
        for tokens, logprobs, tops in self._generate(prompts, params, use_adapter=True, chat=True, logits=True,
                                                     top_n=top_logprobs):
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            labels.append(Label.of(self.tokenizer, text, tokens, logprobs, tops))
        return labels

    def score(self, queries: list[str], responses: list[str], known_expert: list | None = None,
              top_n: int = 0) -> list[TokenScores]:
        return score_pairs(self.model, self.tokenizer, queries, responses, self.batch_size, "left", self.max_length,
                           self.max_batch_tokens, known_expert, top_n=top_n)

    @torch.no_grad()
    def response_logprobs(self, queries: list[str], responses: list[str], use_adapter: bool) -> list[np.ndarray]:
        with self.adapter_context(use_adapter):
            return text_logprobs(self.model, self.tokenizer, queries, responses, self.batch_size)

    def shutdown(self) -> None:
        import gc

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
