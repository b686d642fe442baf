"""``titok eval --harness TASKS``: lm-evaluation-harness on a base model + adapter, the way this field
reports BBH, MMLU and the rest.

lm-eval's own Hugging Face backend (``HFLM`` with ``peft=``) loads and evaluates; titok only hands it
what it cannot know: the tokenizer carrying the chat template the adapter was trained with (the
adapter's ``chat_template.jinja``, else the one titok formats prompts with, ``load_tokenizer``; a
base without a template, such as Gemma-3-270M, gets titok's plain one), with ``apply_chat_template``
on, so the harness asks the adapter questions in the format it learned. lm-eval's results are
written with lm-eval's own serializer, next to titok's report.
"""

from __future__ import annotations

import json
from pathlib import Path

from titok.config import ConfigError

__all__ = ["check_harness_tasks", "harness_tokenizer", "run_harness", "write_harness_results"]


def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_harness_tasks(tasks: list[str], include_path: str | None) -> None:
    """Every task name lm-eval knows (its registry plus ``include_path``), before any model loads."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("harness: lm-evaluation-harness is not installed (pip install 'titok[harness]')") from None
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"harness_include: {include_path} is not a folder of lm-eval task YAML files")
    known = set(_task_manager(include_path).all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise ConfigError(f"harness: lm-eval has no task {unknown}" + (f" (with the tasks of {include_path})"
                                                                          if include_path else "")
                          + "; `lm-eval ls tasks` lists them")


def harness_tokenizer(base: str, adapter: str | None, trust_remote_code: bool = False):
    """The base's tokenizer with the chat template the adapter was trained with."""
    from titok.export import CHAT_TEMPLATE_FILE
    from titok.models import load_tokenizer

    tokenizer = load_tokenizer(base, trust_remote_code)
    shipped = Path(adapter) / CHAT_TEMPLATE_FILE if adapter else None
    if shipped is not None and shipped.is_file():
        tokenizer.chat_template = shipped.read_text()
    return tokenizer


def run_harness(cfg, seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` over ``cfg.harness`` (an ``EvalConfig``) on ``cfg.examples``
    documents per task; lm-eval's results dict."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from titok.hardware import resolve_dtype
    from titok.models import chat_template, hub_id, resolve_model_path

    dtype, _ = resolve_dtype(cfg.dtype, training=False)
    tokenizer = harness_tokenizer(cfg.base, cfg.adapter)
    model = HFLM(pretrained=resolve_model_path(cfg.base), peft=cfg.adapter, dtype=dtype, batch_size=cfg.batch_size,
                 tokenizer=tokenizer, device="cuda" if torch.cuda.is_available() else "cpu")
    results = lm_eval.simple_evaluate(
        model=model, tasks=list(cfg.harness), limit=cfg.examples, apply_chat_template=True, log_samples=True,
        task_manager=_task_manager(cfg.harness_include), random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed,
        gen_kwargs={"max_gen_toks": cfg.max_new_tokens} if cfg.max_new_tokens else None)
    # what lm-eval's own CLI records and simple_evaluate does not: how the prompts were formatted
    results["titok"] = {"base": hub_id(cfg.base), "adapter": Path(cfg.adapter).name if cfg.adapter else None,
                        "apply_chat_template": True, "chat_template": chat_template(tokenizer), "dtype": dtype}
    return results


def write_harness_results(results: dict, path: str | Path) -> Path:
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return path
