"""``titok plan``: what a transplant needs per GPU and per node, and what it costs, from configs alone.

    titok plan --config configs/llama70b.yaml --gpus-per-node 8 --gpu-memory-gib 80 --nodes 2

Every number comes from each model's ``config.json`` on the meta device (``model_shape``) and from
the transplant config; no weights are read. Memory per GPU and host RAM per node for the engine
stages (queries, labels, scores on the source) and for training (the target); time and GPU-hours
from FLOPs at a stated model-FLOPs utilisation plus weight loading at a stated bandwidth. Where a
stage does not fit, the plan says so with the numbers and suggests settings that do.

The arithmetic, with its assumptions (bytes are per GPU unless said otherwise):
- engine weights: params x dtype bytes / (TP x PP); a vLLM LoRA slot holds every decoder projection
  at ``max_lora_rank``; the engine's activation peak is ``max_num_batched_tokens`` x (vocab x 4 bytes
  of fp32 logits for prompt log-probs + 8 x hidden x 2); KV cache = what is left of
  ``gpu_memory_utilization`` x GPU memory, in tokens of ``kv_bytes_per_token / (TP x PP)``.
- training model states (DeepSpeed's own accounting, ``estimate_zero3_model_states_mem_needs``,
  generalised to a frozen base F plus trainable LoRA T; with T = everything it equals DeepSpeed's):
  ZeRO-3 = 4 x largest module (gather buffers) + (2F + 18T) / N; ZeRO-2 = 2(F+T) + 18T / N;
  offload moves the 16 (optimizer) or 18 + 2 (and parameters) bytes to host RAM.
- activations per sequence of S tokens: (7 x hidden + 4 x mlp width) x 2 bytes per token per layer;
  with checkpointing, layers x hidden x 2 per token plus one layer recomputed. Logits: response
  tokens x vocab x 14 bytes (bf16 logits, fp32 copy, log-softmax, gradient).
- vLLM's batched tokens per step: ``engine.max_num_batched_tokens``, else 16,384 on GPUs of 70 GiB or
  more and 8,192 below (vLLM's own rule), at least ``max_length``; titok passes the same number to
  vLLM (``vllm_batched_tokens``), so plan and engine agree by construction. Logits for prompt
  log-probs are whole on every tensor-parallel rank (vLLM gathers them), so they are not divided by TP.
- training sequences are ``train.max_length`` tokens (default ``engine.max_length``).
- FLOPs: generation and scoring 2 x params per token; LoRA training 4 x params per token (no weight
  gradients for the base) + 2 x params with checkpointing (the recompute).
- ZeRO-3 traffic: every micro-step all-gathers the whole base for the forward pass, again for the
  backward pass, and once more for the recompute with checkpointing: (2 or 3) x model bytes x (N-1)/N
  received per GPU, over NVLink within one node or over the inter-node links (the ring's slowest
  hop) across nodes; no overlap with compute is assumed. The LoRA's gradient reduction is negligible.
- weight loading: an engine node reads its actors' copies; under ZeRO-3 rank 0 reads the whole target
  alone (transformers' ZeRO-3 load) and broadcasts each layer to the other ranks.
- the align stage with a target-side reference (``filter.reference``) loads the whole target on
  ``filter.reference_gpus`` GPUs of one node (device_map), for a forward pass over the kept samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from titok.choices import ENGINES, FILTER_METHODS
from titok.core.validation_split import validation_count
from titok.gpu_facts import GIB, vllm_batched_tokens, vllm_lora_rank
from titok.runstate import ADAPTER_CONFIG

__all__ = ["Assumptions", "Plan", "Resources", "StagePlan", "activation_bytes", "cluster_resources", "local_resources",
           "logits_bytes", "make_plan", "zero3_gather", "zero_model_states"]

# GPU memory by Ray's accelerator_type label (ray.util.accelerators); unknown types skip memory checks
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "B200": 180, "GH200": 96, "A100-80G": 80, "A100-40G": 40, "A100": 40,
                  "L40S": 48, "L4": 24, "A10G": 24, "T4": 16, "V100": 16}
CUDA_RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL buffers, allocator slack: never planned for tensors
ENGINE_PROCESS_BYTES = 4 * GIB  # host RAM of one GPU engine process (Python, CUDA, tokenizer, pinned buffers)


def zero_model_states(frozen: int, trainable: int, largest_module: int, gpus_per_node: int, nodes: int, stage: int,
                      offload_optimizer: bool = False, offload_params: bool = False,
                      load_bytes: int = 2, buffer_factor: float = 1.5) -> tuple[int, int]:
    """``(bytes per GPU, host bytes per node)`` of DeepSpeed's model states for a frozen base plus
    trainable parameters (``load_bytes``: bytes per parameter when a whole model is loaded on the host)."""
    n = gpus_per_node * nodes
    total = frozen + trainable
    if stage == 3:
        gather = 4 * largest_module
        if offload_optimizer and offload_params:
            return gather, int((18 * trainable + 2 * frozen) / nodes * buffer_factor)
        if offload_optimizer:
            return gather + int(2 * total / n), int(16 * trainable / nodes * buffer_factor)
        if offload_params:
            return gather + int(18 * trainable / n), int(2 * frozen / nodes * buffer_factor)
        return gather + int((2 * frozen + 18 * trainable) / n), int(largest_module * 4 * gpus_per_node * buffer_factor)
    loading = int(total * load_bytes * gpus_per_node * buffer_factor)  # every rank loads the whole model first
    if offload_optimizer:
        return 2 * total, loading + int(16 * trainable / nodes * buffer_factor)
    return 2 * total + int(18 * trainable / n), loading


@dataclass(frozen=True)
class Resources:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float | None  # None: unknown, GPU memory is not checked
    host_memory_gib: float | None  # per node
    cpus_per_node: int | None = None
    gpu_tflops: float = 989.0  # bf16 dense peak per GPU (H100/H200 SXM)
    cpu_gflops_per_core: float = 50.0  # measured ~58 fp32 on an AVX512 EPYC core
    source: str = "command line"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Assumptions:
    mfu_train: float = 0.30
    mfu_inference: float = 0.15  # decode is memory-bound; prefill/scoring runs higher
    load_gbps: float = 2.0  # weight loading per node, GB/s (shared storage or local NVMe)
    prompt_tokens: int = 48  # chat template + instruction around a query
    # all-gather bandwidth one GPU achieves, GB/s: NVLink within a node (H100 SXM: ~360 in NCCL's
    # all_gather busbw of 450 nominal), and the network across nodes (200 Gb/s per GPU = 25 GB/s;
    # 400 Gb/s InfiniBand per GPU reaches ~45)
    intra_node_gbps: float = 300.0
    inter_node_gbps: float = 25.0


@dataclass
class StagePlan:
    stage: str
    model: str
    placement: str
    gpu: dict = field(default_factory=dict)  # component -> bytes per GPU
    host: dict = field(default_factory=dict)  # component -> bytes per node
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    suggestions: list = field(default_factory=list)
    flops: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0  # collectives that do not overlap compute (ZeRO-3's parameter gathers)
    load_s: float = 0.0
    devices: int = 0  # GPUs (or nodes for CPU stages) the stage occupies

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s + self.load_s

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.devices / 3600


@dataclass
class Plan:
    resources: Resources
    assumptions: Assumptions
    stages: list[StagePlan]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def problems(self) -> list[str]:
        return [f"{s.stage}: {p}" for s in self.stages for p in s.problems]

    def to_dict(self) -> dict:
        return {"resources": asdict(self.resources), "assumptions": asdict(self.assumptions), "fits": self.fits,
                "stages": [{**asdict(s), "fits": s.fits, "seconds": s.seconds, "gpu_hours": s.gpu_hours}
                           for s in self.stages]}

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.stage == name)

    def gpu_bytes_after_engines(self) -> int:
        """Free memory each GPU must have for the stages after the source engines (the most any of
        them needs, with the CUDA reserve); 0 where none runs on GPUs."""
        return max((sum(s.gpu.values()) + CUDA_RESERVE_BYTES for s in self.stages[1:] if s.gpu), default=0)

    def table(self) -> str:
        r = self.resources
        gpu_mem = f"{r.gpu_memory_gib:g} GiB" if r.gpu_memory_gib else "unknown memory"
        lines = [f"resources ({r.source}): {r.nodes} node(s) x {r.gpus_per_node} GPU(s) ({gpu_mem}), host "
                 f"{_gib(r.host_memory_gib * GIB) if r.host_memory_gib else 'unknown'} per node",
                 "", "| stage | model | placement | per GPU | host per node | time | GPU-h | fits |", "|---|---|---|---|---|---|---|---|"]
        for s in self.stages:
            per_gpu = _gib(sum(s.gpu.values())) if s.gpu else "-"
            lines.append(f"| {s.stage} | {s.model} | {s.placement} | {per_gpu} | {_gib(sum(s.host.values()))} | "
                         f"{_duration(s.seconds)} | {s.gpu_hours:.2f} | {'yes' if s.fits else '**no**'} |")
        for s in self.stages:
            lines += ["", f"{s.stage} ({s.model}):"]
            if s.gpu:
                lines.append("  per GPU: " + ", ".join(f"{k} {_gib(v)}" for k, v in s.gpu.items()))
            lines.append("  host per node: " + ", ".join(f"{k} {_gib(v)}" for k, v in s.host.items()))
            comm = f", ZeRO-3 parameter gathers {_duration(s.comm_s)}" if s.comm_s else ""
            lines.append(f"  {s.flops:.3g} FLOP: compute {_duration(s.compute_s)}{comm}, weight loading {_duration(s.load_s)}")
            lines += [f"  {n}" for n in s.notes]
            lines += [f"  DOES NOT FIT: {p}" for p in s.problems]
            lines += [f"  try: {x}" for x in s.suggestions]
        a = self.assumptions
        lines += ["", f"assumptions: MFU {a.mfu_train:.0%} training, {a.mfu_inference:.0%} inference; "
                      f"{r.gpu_tflops:g} TFLOP/s bf16 per GPU; weights load at {a.load_gbps:g} GB/s per node; "
                      f"all-gathers at {a.intra_node_gbps:g} GB/s per GPU within a node, {a.inter_node_gbps:g} across nodes; "
                      f"{_gib(CUDA_RESERVE_BYTES)} per GPU kept free for CUDA/NCCL; "
                      f"{_gib(ENGINE_PROCESS_BYTES)} host RAM per GPU engine process"]
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _plan_dtype(dtype: str, on_gpu: bool) -> str:
    """``auto`` as the plan assumes it: bf16 on GPUs, fp32 on CPUs (the conservative case)."""
    return ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype


# ---------------------------------------------------------------- engines (source model)

def _engine_stage(cfg, shape, adapter_rank: int, res: Resources, a: Assumptions) -> StagePlan:
    e = cfg.engine
    on_gpu = e.gpus_per_actor > 0
    dtype = _plan_dtype(e.dtype, on_gpu)
    wbytes = _dtype_bytes(dtype)
    spec = ENGINES[e.name]
    tensor_parallel = spec.shards == "tensor_parallel"
    shards = e.tensor_parallel_size * e.pipeline_parallel_size if tensor_parallel else max(1, math.ceil(e.gpus_per_actor))
    placement = (f"{e.actors} actor(s) x {e.gpus_per_actor:g} GPU" + (f" (TP {e.tensor_parallel_size}, PP {e.pipeline_parallel_size})"
                 if tensor_parallel else "") if on_gpu else f"{e.actors} actor(s) on CPU") + f", {e.name}"
    stage = StagePlan("engine: queries, labels, scores", shape.name, placement)
    weights = shape.params * wbytes
    seq = e.max_length
    if on_gpu and spec.gpu_memory == "preallocated":  # vLLM: weights, LoRA slots, activations, then KV cache
        rank = vllm_lora_rank(e.max_lora_rank or adapter_rank)
        slot = shape.layers * rank * sum(i + o for i, o in shape.linear_dims.values()) * wbytes
        tokens = vllm_batched_tokens(e.max_num_batched_tokens, seq, res.gpu_memory_gib)
        # prompt log-prob logits are gathered whole on each TP rank; the layer activations are sharded
        stage.gpu = {"weights": weights // shards, "LoRA slots": e.max_loras * slot // shards,
                     "activations": tokens * shape.vocab * 4 + tokens * 8 * shape.hidden * 2 // e.tensor_parallel_size}
        stage.notes.append(f"max_num_batched_tokens {tokens:,} per engine step (passed to vLLM)")
        if res.gpu_memory_gib:
            budget = res.gpu_memory_gib * GIB * e.gpu_memory_utilization
            kv_left = budget - sum(stage.gpu.values())
            kv_tokens = int(max(kv_left, 0) // (shape.kv_bytes_per_token(wbytes) / shards))
            stage.gpu["KV cache"] = int(max(kv_left, 0))
            stage.notes.append(f"KV cache: {kv_tokens:,} tokens ({kv_tokens // seq:,} sequences of max_length {seq}); "
                               f"LoRA slots: {e.max_loras} at rank {rank}")
            if kv_tokens < seq:
                stage.problems.append(f"weights {_gib(weights / shards)} + LoRA {_gib(e.max_loras * slot / shards)} + "
                                      f"activations leave room for {kv_tokens} KV tokens per engine, fewer than "
                                      f"max_length={seq}, within {e.gpu_memory_utilization:g} x {res.gpu_memory_gib:g} GiB")
        stage.host["engine processes"] = ENGINE_PROCESS_BYTES * e.actors // max(res.nodes, 1)
    elif on_gpu:  # transformers, device_map over the actor's GPUs; logits of a batch land on one GPU
        kv = e.batch_size * seq * shape.kv_bytes_per_token(wbytes)
        logits = e.batch_size * seq * shape.vocab * (wbytes + 8)
        stage.gpu = {"weights": weights // shards, "KV cache (generation)": kv // shards, "logits (scoring)": logits}
        stage.host["engine processes"] = ENGINE_PROCESS_BYTES * e.actors // max(res.nodes, 1)
    else:
        per_actor = weights + e.batch_size * seq * (shape.kv_bytes_per_token(wbytes) + shape.vocab * (wbytes + 8))
        actors_per_node = math.ceil(e.actors / max(res.nodes, 1))
        stage.host = {"weights": weights * actors_per_node, "activations, KV, logits": (per_actor - weights) * actors_per_node}
    _check_engine_fit(stage, e, shards, res)

    pool = cfg.pool_size
    query_tokens = cfg.queries.max_new_tokens
    prompts = pool * cfg.queries.oversample
    tokens = {"queries": prompts * (cfg.queries.few_shot * query_tokens + query_tokens),
              "labels": pool * (a.prompt_tokens + query_tokens + cfg.labels.max_new_tokens),
              "scores": 2 * pool * (a.prompt_tokens + query_tokens + cfg.labels.max_new_tokens)}
    stage.flops = 2 * shape.params * sum(tokens.values())
    stage.notes.append("tokens: " + ", ".join(f"{k} {v:,.0f}" for k, v in tokens.items()) + " (upper bounds)")
    stage.devices = e.actors * (e.gpus_per_actor if on_gpu else 0)
    rate = (stage.devices * res.gpu_tflops * 1e12) if on_gpu else (e.actors * e.cpus_per_actor * res.cpu_gflops_per_core * 1e9)
    stage.compute_s = stage.flops / (rate * a.mfu_inference)
    stage.load_s = weights * math.ceil(e.actors / max(res.nodes, 1)) / (a.load_gbps * 1e9)
    return stage


def _check_engine_fit(stage: StagePlan, e, shards: int, res: Resources) -> None:
    on_gpu = e.gpus_per_actor > 0
    if on_gpu:
        if res.gpus == 0:
            stage.problems.append(f"engine.gpus_per_actor={e.gpus_per_actor:g} but the cluster has no GPUs")
            return
        spec = ENGINES[e.name]
        if spec.shards == "tensor_parallel" and e.tensor_parallel_size > res.gpus_per_node:
            stage.problems.append(f"engine.tensor_parallel_size={e.tensor_parallel_size} is more than the "
                                  f"{res.gpus_per_node} GPUs of one node (tensor parallelism stays within a node)")
        elif spec.shards == "device_map" and e.gpus_per_actor > res.gpus_per_node:
            stage.problems.append(f"engine.gpus_per_actor={e.gpus_per_actor:g} is more than the {res.gpus_per_node} GPUs of one node")
        if e.actors * e.gpus_per_actor > res.gpus:
            stage.problems.append(f"{e.actors} actors x {e.gpus_per_actor:g} GPUs need {e.actors * e.gpus_per_actor:g} GPUs; "
                                  f"the cluster has {res.gpus}")
        if res.gpu_memory_gib and spec.gpu_memory == "grows":  # a preallocated engine fits by construction
            need = sum(stage.gpu.values()) + CUDA_RESERVE_BYTES
            if need > res.gpu_memory_gib * GIB:
                stage.problems.append(f"needs {_gib(need)} per GPU (with {_gib(CUDA_RESERVE_BYTES)} reserve), "
                                      f"the GPUs have {res.gpu_memory_gib:g} GiB")
    if res.host_memory_gib and sum(stage.host.values()) > res.host_memory_gib * GIB:
        stage.problems.append(f"needs {_gib(sum(stage.host.values()))} of host RAM per node, nodes have "
                              f"{res.host_memory_gib:g} GiB")


# ---------------------------------------------------------------- training (target model)

def activation_bytes(shape, sequences: int, seq: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass of ``sequences`` x ``seq`` tokens."""
    per_token_layer = (7 * shape.hidden + 4 * shape.intermediate) * dtype_bytes
    if checkpointing:  # each layer's input, plus one layer recomputed at a time
        return sequences * seq * (shape.layers * shape.hidden * dtype_bytes + per_token_layer)
    return sequences * seq * shape.layers * per_token_layer


def logits_bytes(shape, sequences: int, response: int) -> int:
    """Logits of the response positions: bf16 logits, their fp32 copy, log-softmax and gradient."""
    return sequences * response * shape.vocab * 14


def _train_memory(shape, lora_params: int, t, micro: int, seq: int, response: int, res: Resources,
                  workers: int, on_gpu: bool, checkpointing: bool) -> tuple[dict, dict]:
    """``(per device, per node)`` byte components for one training setting."""
    wbytes = _dtype_bytes(_plan_dtype(t.dtype, on_gpu))
    gpus_per_node, nodes = _train_nodes(workers, res, on_gpu)
    states_gpu, states_host = zero_model_states(shape.params, lora_params, shape.largest_module_params, gpus_per_node,
                                                nodes, t.deepspeed_stage, t.offload_optimizer, t.offload_params,
                                                load_bytes=wbytes)
    if wbytes == 4:  # fp32 training holds fp32 weights where DeepSpeed's accounting assumes 16-bit ones
        states_gpu += (2 * shape.params) // (workers if t.deepspeed_stage == 3 else 1)
    device = {"model states": states_gpu, "activations": activation_bytes(shape, micro, seq, wbytes, checkpointing),
              "logits": logits_bytes(shape, micro, response)}
    return device, {"model states, loading": states_host}


def _train_nodes(workers: int, res: Resources, on_gpu: bool) -> tuple[int, int]:
    """``(workers per node, nodes)`` of the training group (Ray packs GPU workers onto full nodes)."""
    per_node = min(res.gpus_per_node, workers) if on_gpu and res.gpus_per_node else math.ceil(workers / max(res.nodes, 1))
    return per_node, math.ceil(workers / max(per_node, 1))


def zero3_gather(params: int, dtype_bytes: int, workers: int, micro_steps: int, checkpointing: bool,
                 link_gbps: float) -> tuple[float, float]:
    """``(seconds, bytes per GPU per micro-step)`` of ZeRO-3's parameter all-gathers: the whole base
    for the forward pass, for the backward pass and (with checkpointing) for the recompute, each GPU
    receiving (N-1)/N of it over a link of ``link_gbps`` (NVLink within a node, the network across)."""
    if workers < 2:
        return 0.0, 0.0
    passes = 3 if checkpointing else 2
    per_micro_step = passes * params * dtype_bytes * (workers - 1) / workers
    return micro_steps * per_micro_step / (link_gbps * 1e9), per_micro_step


def _train_stage(cfg, shape, res: Resources, a: Assumptions, suggest: bool = True) -> StagePlan:
    from titok.train.ray_train import GRADIENT_CHECKPOINTING_MIN_PARAMS

    t = cfg.train
    on_gpu = t.use_gpu
    lora_params = shape.lora_params(t.lora.rank, t.lora.target_modules)
    checkpointing = t.gradient_checkpointing if t.gradient_checkpointing != "auto" else \
        shape.params >= GRADIENT_CHECKPOINTING_MIN_PARAMS
    micro = min(t.micro_batch_size, t.global_batch_size // t.workers)
    seq = cfg.train_max_length
    response = min(cfg.labels.max_new_tokens + 1, seq)
    placement = (f"{t.workers} worker(s) x 1 GPU" if on_gpu else f"{t.workers} worker(s) on CPU") + \
        f", ZeRO-{t.deepspeed_stage}, micro-batch {micro}" + (", checkpointing" if checkpointing else "") + \
        (", optimizer offload" if t.offload_optimizer else "") + (", param offload" if t.offload_params else "")
    stage = StagePlan("train", shape.name, placement)
    device, host = _train_memory(shape, lora_params, t, micro, seq, response, res, t.workers, on_gpu, checkpointing)
    if on_gpu:
        stage.gpu = device
        stage.host = host
    else:
        per_node = math.ceil(t.workers / max(res.nodes, 1))
        stage.host = {**{k: v * per_node for k, v in device.items()}, **host}
    stage.notes.append(f"LoRA r={t.lora.rank} on {'/'.join(t.lora.target_modules)}: {lora_params:,} trainable of "
                       f"{shape.params:,} parameters; activations "
                       f"{'with' if checkpointing else 'without'} checkpointing at {seq} tokens x micro-batch {micro}")
    if on_gpu:
        other = _train_memory(shape, lora_params, t, micro, seq, response, res, t.workers, on_gpu, not checkpointing)[0]
        stage.notes.append(f"activations {'without' if checkpointing else 'with'} checkpointing would be "
                           f"{_gib(other['activations'])} per GPU")
    _check_train_fit(stage, t, res, on_gpu)
    if suggest and not stage.fits and on_gpu and res.gpus and res.gpu_memory_gib:
        stage.suggestions += _train_suggestions(cfg, shape, res, a)

    rows = min(cfg.filter.top_m, cfg.pool_size) if FILTER_METHODS[cfg.filter.method].keeps_m else cfg.pool_size
    held_out = validation_count(rows, t.validation_fraction)
    rows -= held_out
    rates = len(t.lr_search) or 1  # an lr search trains one LoRA per rate
    samples = rates * (t.max_steps * t.global_batch_size if t.max_steps else rows * t.epochs)
    tokens = samples * min(a.prompt_tokens + cfg.queries.max_new_tokens + cfg.labels.max_new_tokens, seq)
    stage.flops = (4 + (2 if checkpointing else 0)) * shape.params * tokens
    budget = f"{t.max_steps} steps x {t.global_batch_size}" if t.max_steps else f"{rows} samples x {t.epochs} epochs"
    stage.notes.append(f"trained tokens: {tokens:,} ({budget}{f' x {rates} learning rates' if rates > 1 else ''}, "
                       f"upper bound{f'; {held_out} samples held out for validation' if held_out else ''})")
    stage.devices = t.workers if on_gpu else 0
    rate = t.workers * (res.gpu_tflops * 1e12 if on_gpu else t.cpus_per_worker * res.cpu_gflops_per_core * 1e9)
    stage.compute_s = stage.flops / (rate * a.mfu_train)
    model_bytes = shape.params * _dtype_bytes(_plan_dtype(t.dtype, on_gpu))
    stage.load_s = model_bytes / (a.load_gbps * 1e9)
    if t.deepspeed_stage == 3 and t.workers > 1:
        nodes = _train_nodes(t.workers, res, on_gpu)[1]
        micro_steps = math.ceil(samples / (t.workers * micro))
        link = a.intra_node_gbps if nodes == 1 else a.inter_node_gbps
        broadcast_s = model_bytes / (link * 1e9)  # rank 0's layers to every other rank, pipelined
        stage.load_s += broadcast_s
        stage.notes.append(f"weight loading: rank 0 reads all {_gib(model_bytes)} alone ({_duration(model_bytes / (a.load_gbps * 1e9))} "
                           f"at {a.load_gbps:g} GB/s) and broadcasts each layer to the other ranks ({_duration(broadcast_s)})")
        if not t.offload_params:
            stage.comm_s, per_micro = zero3_gather(shape.params, _dtype_bytes(_plan_dtype(t.dtype, on_gpu)), t.workers,
                                                   micro_steps, checkpointing, link)
            where = "within one node (NVLink)" if nodes == 1 else f"across {nodes} nodes"
            stage.notes.append(f"ZeRO-3 gathers {_gib(per_micro)} per GPU per micro-step ({3 if checkpointing else 2} "
                               f"passes over the base) x {micro_steps} micro-steps {where} at {link:g} GB/s: "
                               f"{_duration(stage.comm_s)}, not overlapped with compute")
            if nodes > 1 and suggest:
                stage.notes += _one_node_note(cfg, shape, res, a, stage)
        else:
            stage.notes.append("ZeRO-3 with offload_params: the gathers come from host memory over PCIe (not timed here)")
        if rates > 1:
            stage.load_s *= rates
            stage.notes.append(f"ZeRO-3 binds the base to one DeepSpeed engine: each of the {rates} learning rates "
                               "loads the target again")
    _held_out_answers(stage, cfg, shape, res, a, rates, held_out)
    return stage


def _held_out_answers(stage: StagePlan, cfg, shape, res: Resources, a: Assumptions, rates: int, held_out: int) -> None:
    """The cost of ``train.validation_generations``: each rate's LoRA answers that many held-out queries
    after its last step, greedy, up to ``answer_budget`` new tokens. Small next to training, except
    under ZeRO-3 on several workers: there each rate gathers the whole base once where it fits beside
    what training holds (``validation_split.gathers_base_once``), else every decode step gathers it."""
    from titok.core.validation_split import answer_budget, gathers_base_once

    t = cfg.train
    answers = min(t.validation_generations, held_out)
    if not answers:
        return
    budget = answer_budget(cfg.labels.max_new_tokens)  # the longest expert response, counted in source tokens
    stage.flops += 2 * shape.params * rates * answers * (a.prompt_tokens + budget)
    stage.notes.append(f"held-out answers (train.validation_generations): {answers} per rate, up to {budget} new "
                       "tokens each")
    if t.deepspeed_stage == 3 and t.workers > 1 and not t.offload_params:
        on_gpu = t.use_gpu
        link = a.intra_node_gbps if _train_nodes(t.workers, res, on_gpu)[1] == 1 else a.inter_node_gbps
        base_bytes = shape.params * _dtype_bytes(_plan_dtype(t.dtype, on_gpu))
        per_gather = base_bytes * (t.workers - 1) / t.workers
        free = res.gpu_memory_gib * GIB - sum(stage.gpu.values()) if on_gpu and res.gpu_memory_gib else None
        if t.gather_base_for_answers == "auto" and gathers_base_once(base_bytes, free):
            seconds = rates * per_gather / (link * 1e9)
            stage.comm_s += seconds
            stage.notes.append(f"under ZeRO-3 each rate gathers the whole base ({_gib(base_bytes)}) once for them, beside "
                               f"what training holds: {_duration(seconds)}")
            return
        why = ("train.gather_base_for_answers=never" if t.gather_base_for_answers == "never" else
               "GPU memory unknown" if free is None else "all of it at once does not fit beside what training holds")
        seconds = rates * budget * per_gather / (link * 1e9)
        stage.comm_s += seconds
        stage.notes.append(f"under ZeRO-3 each of their {rates * budget} decode steps gathers the whole base "
                           f"({_gib(per_gather)} per GPU; {why}): {_duration(seconds)}; "
                           "--set train.validation_generations=0 skips them")


def _one_node_note(cfg, shape, res: Resources, a: Assumptions, stage: StagePlan) -> list[str]:
    """ZeRO-3 across nodes gathers over the network: the same recipe on one node's GPUs, if it fits."""
    workers = res.gpus_per_node
    if workers < 2 or cfg.train.global_batch_size % workers:
        return []
    one_node = _train_stage(cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": workers})}), shape,
                            res, a, suggest=False)
    if not one_node.fits or one_node.seconds >= stage.seconds:
        return []
    return [f"on one node (--set train.workers={workers}) the gathers stay on NVLink: {_duration(one_node.seconds)} "
            f"in all ({_duration(one_node.comm_s)} of gathers) instead of {_duration(stage.seconds)}, "
            f"{_gib(sum(one_node.gpu.values()))} per GPU"]


def _check_train_fit(stage: StagePlan, t, res: Resources, on_gpu: bool) -> None:
    if on_gpu:
        if res.gpus == 0:
            stage.problems.append("train.use_gpu is on but the cluster has no GPUs")
            return
        if t.workers > res.gpus:
            stage.problems.append(f"train.workers={t.workers} (one GPU each) but the cluster has {res.gpus} GPUs")
        if res.gpu_memory_gib:
            need = sum(stage.gpu.values()) + CUDA_RESERVE_BYTES
            if need > res.gpu_memory_gib * GIB:
                stage.problems.append(f"needs {_gib(need)} per GPU ({', '.join(f'{k} {_gib(v)}' for k, v in stage.gpu.items())}, "
                                      f"{_gib(CUDA_RESERVE_BYTES)} reserve); the GPUs have {res.gpu_memory_gib:g} GiB")
    if res.host_memory_gib and sum(stage.host.values()) > res.host_memory_gib * GIB:
        stage.problems.append(f"needs {_gib(sum(stage.host.values()))} of host RAM per node, nodes have {res.host_memory_gib:g} GiB")


def _train_suggestions(cfg, shape, res: Resources, a: Assumptions) -> list[str]:
    """The first settings, in order of cost, under which the whole training stage fits (memory, GPU
    count and host RAM: each trial is planned in full)."""
    t = cfg.train
    steps = [{}, {"gradient_checkpointing": True}, {"deepspeed_stage": 3}, {"workers": res.gpus},
             {"micro_batch_size": 1}, {"offload_optimizer": True}, {"offload_params": True}]
    changes: dict = {"workers": res.gpus} if t.workers > res.gpus else {}
    for step in steps:
        changes.update(step)
        if not changes:
            continue
        trial = t.model_copy(update=changes)
        if trial.global_batch_size % trial.workers:
            changes["global_batch_size"] = trial.workers * max(1, t.global_batch_size // trial.workers)
            trial = trial.model_copy(update={"global_batch_size": changes["global_batch_size"]})
        planned = _train_stage(cfg.model_copy(update={"train": trial}), shape, res, a, suggest=False)
        if planned.fits:
            return [" ".join(f"--set train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())
                    + f"  ({_gib(sum(planned.gpu.values()))} per GPU)"]
    return [f"no setting tried fits {res.gpus} x {res.gpu_memory_gib:g} GiB GPUs; use more or larger GPUs"]


# ---------------------------------------------------------------- align (target-side reference)

def _align_stage(cfg, shape, res: Resources, a: Assumptions) -> StagePlan:
    """The target base scoring the kept samples (``filter.reference`` other than source_amateur):
    whole, on ``filter.reference_gpus`` GPUs of one node (or on a CPU actor)."""
    f, on_gpu = cfg.filter, cfg.train.use_gpu
    gpus = f.reference_gpus if on_gpu else 0
    wbytes = _dtype_bytes(_plan_dtype(cfg.engine.dtype, on_gpu))
    weights = shape.params * wbytes
    seq, response = cfg.engine.max_length, min(cfg.labels.max_new_tokens + 1, cfg.engine.max_length)
    work = {"activations": f.reference_batch_size * seq * (shape.hidden + shape.intermediate) * wbytes,
            "logits": f.reference_batch_size * response * shape.vocab * (wbytes + 8)}
    stage = StagePlan("align", shape.name, f"1 actor x {gpus} GPU(s), device_map" if on_gpu else "1 actor on CPU")
    if on_gpu:
        stage.gpu = {"weights": weights // gpus, **work}
        _check_align_fit(stage, gpus, res)
        if not stage.fits and res.gpu_memory_gib:
            fitting = [n for n in range(1, res.gpus_per_node + 1)
                       if weights // n + sum(work.values()) + CUDA_RESERVE_BYTES <= res.gpu_memory_gib * GIB]
            stage.suggestions.append(f"--set filter.reference_gpus={fitting[0]}" if fitting else
                                     "--set filter.reference=source_amateur (the paper's reference needs no target model)")
    else:
        stage.host = {"weights": weights, **work}
        if res.host_memory_gib and sum(stage.host.values()) > res.host_memory_gib * GIB:
            stage.problems.append(f"needs {_gib(sum(stage.host.values()))} of host RAM, nodes have {res.host_memory_gib:g} GiB")
    tokens = min(f.top_m, cfg.pool_size) * min(a.prompt_tokens + cfg.queries.max_new_tokens + cfg.labels.max_new_tokens, seq)
    stage.flops = 2 * shape.params * tokens
    stage.devices = gpus
    rate = gpus * res.gpu_tflops * 1e12 if on_gpu else cfg.train.cpus_per_worker * res.cpu_gflops_per_core * 1e9
    stage.compute_s = stage.flops / (rate * a.mfu_inference)
    stage.load_s = weights / (a.load_gbps * 1e9)
    return stage


def _check_align_fit(stage: StagePlan, gpus: int, res: Resources) -> None:
    if gpus > res.gpus_per_node:
        stage.problems.append(f"filter.reference_gpus={gpus} is more than the {res.gpus_per_node} GPUs of one node "
                              "(the target is split over one actor's GPUs)")
    elif res.gpu_memory_gib:
        need = sum(stage.gpu.values()) + CUDA_RESERVE_BYTES
        if need > res.gpu_memory_gib * GIB:
            stage.problems.append(f"the target base whole on {gpus} GPU(s) needs {_gib(need)} per GPU "
                                  f"({', '.join(f'{k} {_gib(v)}' for k, v in stage.gpu.items())}, "
                                  f"{_gib(CUDA_RESERVE_BYTES)} reserve); the GPUs have {res.gpu_memory_gib:g} GiB")


def _engine_suggestions(cfg, shape, adapter_rank: int, res: Resources, a: Assumptions) -> list[str]:
    e = cfg.engine
    if ENGINES[e.name].shards != "tensor_parallel" or e.gpus_per_actor == 0:
        return []
    for tp in (1, 2, 4, 8, 16):
        if tp <= e.tensor_parallel_size or tp > res.gpus_per_node or shape.heads % tp:
            continue
        trial = cfg.model_copy(update={"engine": e.model_copy(update={"tensor_parallel_size": tp, "gpus_per_actor": tp * e.pipeline_parallel_size,
                                                                      "actors": max(1, min(e.actors, res.gpus // (tp * e.pipeline_parallel_size)))})})
        if _engine_stage(trial, shape, adapter_rank, res, a).fits:
            return [f"--set engine.tensor_parallel_size={tp} --set engine.gpus_per_actor={tp * e.pipeline_parallel_size} "
                    f"--set engine.actors={trial.engine.actors}"]
    return []


def _adapter_rank(folder: str) -> int | None:
    import json
    from pathlib import Path

    path = Path(folder) / ADAPTER_CONFIG
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # planned before the adapter exists: max_lora_rank or 8 stands in


def make_plan(cfg, resources: Resources, assumptions: Assumptions = Assumptions(), adapter_rank: int | None = None) -> Plan:
    """The plan for transplant config ``cfg`` on ``resources``; reads only the models' configs."""
    from titok.model_shape import field_shape

    source = field_shape("source_base", cfg.source_base, cfg.trust_remote_code)
    target = field_shape("target_base", cfg.target_base, cfg.trust_remote_code)
    rank = adapter_rank or cfg.engine.max_lora_rank or _adapter_rank(cfg.source_adapter) or 8
    engine = _engine_stage(cfg, source, rank, resources, assumptions)
    if not engine.fits:
        engine.suggestions += _engine_suggestions(cfg, source, rank, resources, assumptions)
    align = [_align_stage(cfg, target, resources, assumptions)] if cfg.filter.token_reference != "source_amateur" else []
    return Plan(resources, assumptions, [engine, *align, _train_stage(cfg, target, resources, assumptions)])


def local_resources() -> Resources:
    """This machine as a one-node cluster (no Ray started)."""
    import os

    import torch

    gpus = torch.cuda.device_count()
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if gpus else None
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Resources(nodes=1, gpus_per_node=gpus, gpu_memory_gib=gpu_gib, host_memory_gib=host,
                     cpus_per_node=os.cpu_count(), source="this machine")


def cluster_resources() -> Resources:
    """What the connected Ray cluster reports: its GPU nodes (or all nodes when none has a GPU), the
    smallest host memory among them, and GPU memory from the ``accelerator_type`` label."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [n for n in nodes if n["Resources"].get("GPU", 0) > 0]
    chosen = gpu_nodes or nodes
    types = {key.split(":", 1)[1] for n in chosen for key in n["Resources"] if key.startswith("accelerator_type:")}
    gpu_gib = min((GPU_MEMORY_GIB[t] for t in types if t in GPU_MEMORY_GIB), default=None) if types else None
    return Resources(nodes=len(chosen), gpus_per_node=int(max(n["Resources"].get("GPU", 0) for n in chosen)),
                     gpu_memory_gib=gpu_gib, host_memory_gib=min(n["Resources"].get("memory", 0) for n in chosen) / GIB or None,
                     cpus_per_node=int(min(n["Resources"].get("CPU", 0) for n in chosen)),
                     source=f"Ray cluster{', ' + '/'.join(sorted(types)) if types else ''}")
