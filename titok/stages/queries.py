"""The queries stage: rounds of few-shot query writing on the source engines, checked for the task's
shape (``queries.on_task``, ``titok.core.synthetic_queries.QueryShape``) and filtered for diversity.

Both run on the driver over the whole pool (every engine's output), the ROUGE-L filter against the
seeds too; rejections are counted by reason (``queries.progress.json``, the ``queries_checked``
event, compare's report). Each engine batch is checked and saved as it comes back
(``queries.progress.json``), so the progress line counts kept queries as they come and a run that
stops early (out of rounds, killed, Ctrl-C) keeps what it wrote: rerun, with more
``queries.max_rounds`` if need be, and it goes on from there, writing only the queries of the round
that it lacks. Checks run in query order (a batch back before an earlier one waits for it), so which
engine finishes first does not change which queries are kept. The prompts a stop left unanswered are
sampled afresh on the rerun (a batch's sampling seed follows its first row, and the rerun cuts them
into batches anew), so a stopped pool equals an uninterrupted one up to the stop. Every round goes
through the same engines.
"""

from __future__ import annotations

import json
from collections import Counter
import random
import sys

import numpy as np
import pyarrow as pa

from titok import columns as C
from titok import progress as stage_progress
from titok.core.synthetic_queries import DiversityFilter, QueryShape, build_query_prompt
from titok.runstate import RunDir, write_atomic
from titok.tasks import load_task

__all__ = ["REJECTED_EXAMPLES", "write_query_pool"]

REJECTED_EXAMPLES = 5  # rejected queries kept per reason (progress file, event, report)


def _read_progress(path) -> dict:
    """The kept pool of an earlier attempt; a torn file only costs the rounds it held."""
    if not path.is_file():
        return {}
    try:
        progress = json.loads(path.read_text())
        if isinstance(progress, dict) and isinstance(progress.get("kept"), list):
            return progress
    except ValueError:
        pass
    print(f"warning: {path} is unreadable; writing the query pool from the start", file=sys.stderr, flush=True)
    return {}


def write_query_pool(cfg, run: RunDir, engines) -> pa.Table:
    """``cfg.pool_size`` diverse queries (``sample_id``, ``query``), written by the source engines
    (``engines()`` gives the fleet; adapter off)."""
    task = load_task(cfg.task, seed=cfg.split_seed)
    diversity = DiversityFilter([e["input"] for e in task.seed_examples], cfg.queries.rouge_l_max)
    shape = QueryShape.of([e["input"] for e in task.seed_examples]) if cfg.queries.on_task else None
    params = {"max_new_tokens": cfg.queries.max_new_tokens, "temperature": cfg.queries.temperature,
              "top_p": cfg.queries.top_p, "seed": cfg.seed}
    progress_path = run.root / "queries.progress.json"
    key = run.fingerprint("", {"source_base": cfg.source_base, "task": cfg.task, "seed": cfg.seed, "split": cfg.split_seed,
                               "queries": cfg.queries.model_dump(exclude={"max_rounds"}), "pool": cfg.pool_size})
    progress = _read_progress(progress_path)
    if progress.get("key") != key:
        progress = {"key": key, "kept": [], "written": 0, "rounds": 0}
    diversity.kept = list(progress["kept"])
    rejected = Counter(progress.get("rejected", {}))  # by reason: off task (QueryShape), empty, too similar
    examples = progress.get("rejected_examples", {})  # the first few of each reason, to read what a check refuses
    bar = stage_progress.current()  # kept queries of the pool; each engine batch back counts as written
    if bar:
        bar.start(cfg.pool_size, "queries")
        bar.set(len(diversity.kept))

    def save(**position) -> None:
        """The checked pool, its rejections and where the writing is, in one atomic write."""
        progress.update(kept=diversity.kept, rejected=dict(rejected), rejected_examples=examples, **position)
        write_atomic(progress_path, json.dumps(progress))

    def check(query: str) -> None:
        """One query through the shape and diversity checks (in query order: the ROUGE filter keeps the first
        of two near-duplicates); none once the pool is full."""
        if len(diversity.kept) >= cfg.pool_size:
            return
        why = shape.problem(query) if shape and query.strip() else None
        if why is None and not diversity.offer(query):
            why = "empty" if not query.strip() else f"ROUGE-L >= {cfg.queries.rouge_l_max} to a kept query"
        if why:
            rejected[why] += 1
            if len(examples.setdefault(why, [])) < REJECTED_EXAMPLES:
                examples[why].append(query)

    for round_index in range(progress["rounds"], cfg.queries.max_rounds):
        if len(diversity.kept) >= cfg.pool_size:
            break
        written = progress["written"]
        stopped = progress.get("round_written") or {}
        if stopped.get("round") == round_index:  # a stop inside this round: what was back is checked or waiting
            n_prompts, checked = stopped["prompts"], stopped["checked"]
            waiting = {int(i): q for i, q in stopped["waiting"]}
        else:  # at least one full batch per engine, so none idles
            missing = cfg.pool_size - len(diversity.kept)
            n_prompts = max(int(np.ceil(missing * cfg.queries.oversample)), cfg.engine.batch_size * cfg.engine.actors)
            checked, waiting = 0, {}
        rng = random.Random(f"{cfg.seed}:{round_index}")
        prompts = pa.table({C.SAMPLE_ID: np.arange(written, written + n_prompts, dtype=np.int64),
                            C.MESSAGE: [build_query_prompt(task.seed_examples, cfg.queries.few_shot, rng) for _ in range(n_prompts)]})
        if checked or waiting:
            prompts = prompts.slice(checked)
            prompts = prompts.filter(pa.array([i not in waiting for i in prompts.column(C.SAMPLE_ID).to_pylist()]))
            run.log_event(event="queries_resumed", stage="queries", round=round_index + 1, prompts=n_prompts,
                          kept_from_stop=checked + len(waiting), sent=prompts.num_rows)
        state = {"round": round_index, "prompts": n_prompts, "checked": checked, "waiting": waiting}

        def keep_batch(result, state: dict = state, written: int = written) -> None:
            """Check each batch's queries as they come back, in query order (a batch back before an earlier
            one waits for it), and save: a stop loses only the batches in flight."""
            state["waiting"].update(zip(result.column(C.SAMPLE_ID).to_pylist(), result.column(C.QUERY).to_pylist()))
            while written + state["checked"] in state["waiting"]:
                check(state["waiting"].pop(written + state["checked"]))
                state["checked"] += 1
            save(round_written=state | {"waiting": sorted(state["waiting"].items())})
            if bar:
                bar.set(len(diversity.kept), round=state["round"] + 1,
                        written=written + state["checked"] + len(state["waiting"]))

        if prompts.num_rows:
            engines().map(prompts, "queries", params, on_batch=keep_batch)
        assert state["checked"] == n_prompts and not state["waiting"], state  # every batch back, so all checked
        save(written=written + n_prompts, rounds=round_index + 1, round_written=None)
        if bar:
            bar.set(len(diversity.kept), round=round_index + 1, written=progress["written"])
        else:
            print(f"  queries round {round_index + 1}: {len(diversity.kept)}/{cfg.pool_size} kept of "
                  f"{progress['written']} written", flush=True)
    run.log_event(event="queries_checked", stage="queries", written=progress["written"], kept=len(diversity.kept),
                  rejected=dict(rejected.most_common()), rejected_examples=examples,
                  shape=None if shape is None else vars(shape))
    if len(diversity.kept) < cfg.pool_size:
        reasons = ", ".join(f"{n} {why}" for why, n in rejected.most_common())
        raise RuntimeError(
            f"only {len(diversity.kept)} of {cfg.pool_size} queries passed the checks in {cfg.queries.max_rounds} rounds "
            f"({progress['written']} written; rejected: {reasons or 'none'}; kept so far: {progress_path}); rerun with "
            "more queries.max_rounds to continue from them, or raise queries.rouge_l_max, or set queries.on_task=false "
            "(the shape check), or lower filter.top_m"
        )
    return pa.table({C.SAMPLE_ID: np.arange(len(diversity.kept), dtype=np.int64), C.QUERY: diversity.kept})
