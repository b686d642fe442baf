"""The engine fleet: batches planned so every engine gets work and the last rows spread out, and a fleet
that survives a lost engine (Ray restarts it, its batch is redone on a free engine, no row lost or
doubled) until one engine is lost more often than ``max_restarts`` allows."""

import os
import signal
import time

import pyarrow as pa
import pytest
from hypothesis import given, strategies as st

from titok import columns as C
from titok.runstate import RunDir
from titok.stages.fleet import EngineFleet, EngineLost, plan_batches


@given(rows=st.integers(0, 3000), cap=st.one_of(st.none(), st.integers(1, 128)), engines=st.integers(1, 32))
def test_batches_cover_the_rows_in_order_and_start_every_engine(rows, cap, engines):
    plan = plan_batches(rows, cap, engines)
    assert [start for start, _ in plan] == [sum(size for _, size in plan[:i]) for i in range(len(plan))]
    assert sum(size for _, size in plan) == rows and all(size >= 1 for _, size in plan)
    assert all(size <= cap for _, size in plan) if cap else True
    sizes = [size for _, size in plan]
    assert sizes == sorted(sizes, reverse=True)  # shrinking: the tail spreads over the engines
    if rows >= engines:
        assert len(plan) >= engines  # no engine starts idle
    assert plan == plan_batches(rows, cap, engines)  # the same batches whatever engine runs them


def test_the_last_rows_do_not_queue_behind_one_engine():
    """500 rows on 16 engines in batches of at most 64: fixed batches were 8 (half the engines idle);
    planned ones give every engine a first batch, and the last batches are single rows
    (``bench/bench_fleet.py`` measures what that does to the wall-clock)."""
    plan = plan_batches(500, 64, 16)
    first = [size for _, size in plan[:16]]
    assert first[0] == 16 and min(first) >= 10 and sum(first) > 200  # 40% of the rows on every engine at once
    assert plan[-1][1] == 1


def _rows(n: int) -> pa.Table:
    queries = [f"True and {'not ' * (i % 3)}False or True is" for i in range(n)]
    return pa.table({C.SAMPLE_ID: list(range(n)), C.QUERY: queries})


def _fleet(local_ray, dirs, run_dir, max_restarts: int) -> EngineFleet:
    engine = {"name": "transformers", "base": dirs["source"], "adapter": {"default": dirs["adapter"]},
              "dtype": "float32", "max_length": 160, "batch_size": 2}
    return EngineFleet(str(run_dir), engine, actors=2, options={"num_cpus": 1}, batch_size=2, threads=1,
                       max_restarts=max_restarts)


_PARAMS = {"adapter": "default", "generation": {"max_new_tokens": 12}}


def _kill_after_first_batch(fleet: EngineFleet, engine: int):
    """An ``on_batch`` that SIGKILLs one engine's process when the first batch is back (the other is
    mid-batch, or idle and hit by its next batch): an out-of-memory kill, as Ray sees it."""
    import ray

    pid = ray.get(fleet.actors[engine].__ray_call__.remote(lambda actor: os.getpid()))
    calls = []

    def on_batch(result):
        calls.append(result)
        if len(calls) == 1:
            os.kill(pid, signal.SIGKILL)
    return on_batch


def _wait_until_ready(fleet: EngineFleet) -> None:
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.time() + 120
    while True:
        try:
            ray.get([actor.ready.remote() for actor in fleet.actors])
            return
        except ActorUnavailableError:  # still restarting
            assert time.time() < deadline
            time.sleep(0.5)


@pytest.mark.slow
def test_a_lost_engine_is_restarted_and_its_rows_redone(tiny_model_dirs, tmp_path, local_ray):
    rows = _rows(12)
    fleet = _fleet(local_ray, tiny_model_dirs, tmp_path, max_restarts=2)
    try:
        undisturbed = fleet.map(rows, "labels+scores", _PARAMS)
        disturbed = fleet.map(rows, "labels+scores", _PARAMS, on_batch=_kill_after_first_batch(fleet, 0))
        _wait_until_ready(fleet)  # both serve again
    finally:
        fleet.close()
    for before, after in zip(undisturbed, disturbed):  # labels, then scores: the same rows, once each
        assert after.column(C.SAMPLE_ID).to_pylist() == list(range(12))
        assert after.to_pylist() == before.to_pylist()
    events = RunDir(tmp_path).events()
    (lost,) = [e for e in events if e["event"] == "engine_lost"]
    assert lost["engine"] == 0 and lost["stage"] == "labels+scores" and lost["redone_rows"] >= 1
    assert set(lost["redone_sample_ids"]) <= set(range(12)) and lost["error"]
    loads = [e for e in events if e["event"] == "model_load"]
    assert [e["restarted"] for e in loads] == [False, False, True]  # two engines, the lost one again


@pytest.mark.slow
def test_an_engine_lost_more_often_than_allowed_stops_the_stage_naming_it(tiny_model_dirs, tmp_path, local_ray):
    fleet = _fleet(local_ray, tiny_model_dirs, tmp_path, max_restarts=0)
    try:
        with pytest.raises(EngineLost, match=r"engine 1 died 1 times, more than engine.max_restarts=0; its last "
                                             r"error: .*(died|killed|SIGKILL)"):
            fleet.map(_rows(12), "labels", _PARAMS, on_batch=_kill_after_first_batch(fleet, 1))
    finally:
        fleet.close()
