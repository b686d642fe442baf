"""The run folder's event log under many writers: one file per process, merged by time when read,
and a torn line (a process killed mid-write) skipped with a warning instead of failing the run."""

from __future__ import annotations

import multiprocessing
import os

from titok.runstate import EVENTS_DIR, RunDir


def _write_events(root: str, writer: int, count: int) -> None:
    run = RunDir(root)
    for i in range(count):
        run.log_event(event="tick", writer=writer, i=i, payload="x" * 300)  # lines longer than a small atomic write


def test_processes_writing_at_once_lose_no_event_and_read_back_in_time_order(tmp_path):
    writers, count = 4, 300
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_events, args=(str(tmp_path), w, count)) for w in range(writers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    files = sorted((tmp_path / EVENTS_DIR).glob("*.jsonl"))
    assert len(files) == writers  # one file per writing process
    events = RunDir(tmp_path).events()
    assert len(events) == writers * count
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    for w in range(writers):
        assert [e["i"] for e in events if e["writer"] == w] == list(range(count))


def test_a_torn_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = RunDir(tmp_path)
    for i in range(3):
        run.log_event(event="tick", i=i)
    path = next((tmp_path / EVENTS_DIR).glob("*.jsonl"))
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    path.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # this process died mid-line
    (tmp_path / EVENTS_DIR / f"other-{os.getpid() + 1}.jsonl").write_text('{"time": 1.0, "event": "early"}\n{"tim')
    events = run.events()
    assert [e.get("i", e["event"]) for e in events] == ["early", 0, 1]
    err = capsys.readouterr().err
    assert err.count("skipped 1 unreadable line(s)") == 2 and path.name in err
    # a later process with the same host and pid (a restarted pod) appends to that file: its line stays whole
    run.log_event(event="after")
    assert [e.get("i", e["event"]) for e in run.events()] == ["early", 0, 1, "after"]


def test_runs_from_before_per_process_files_still_read(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"time": 2.0, "event": "old"}\n')
    RunDir(tmp_path).log_event(event="new")
    assert [e["event"] for e in RunDir(tmp_path).events()] == ["old", "new"]


def test_a_stage_run_again_says_which_settings_changed():
    from titok.runstate import settings_change

    before = {"upstream": "u1", "fields": {"train": {"lr": 0.001, "epochs": 2, "lora": {"r": 8}}}}
    assert settings_change(before, {"upstream": "u1", "fields": {"train": {"lr": 0.003, "epochs": 2, "lora": {"r": 16}}}}) == \
        "changed since it completed: train.lr 0.001 -> 0.003; train.lora.r 8 -> 16"
    # a field a newer titok added (an upgrade reruns the stage: say so, with the value it now has)
    assert settings_change(before, {"upstream": "u1", "fields": {"train": {"lr": 0.001, "epochs": 2, "lora": {"r": 8},
                                                                           "warmup": "linear"}}}) == \
        'changed since it completed: train.warmup added ("linear")'
    assert settings_change(before, {"upstream": "u1", "fields": {"train": {"lr": 0.001, "lora": {"r": 8}}}}) == \
        "changed since it completed: train.epochs removed (was 2)"
    assert settings_change(before, {"upstream": "u2", "fields": before["fields"]}) == \
        "an earlier stage's output it was made from changed"
    assert settings_change(None, before) == "its settings changed (the run that completed it kept no record of which)"
    many = {"upstream": "u1", "fields": {f"f{i}": i for i in range(6)}}
    assert settings_change(many, {"upstream": "u1", "fields": {f"f{i}": i + 1 for i in range(6)}}).endswith(
        "f3 3 -> 4; and 2 more")


def test_a_stage_replaced_by_other_settings_is_set_aside_until_the_new_one_completes(tmp_path, capsys):
    """Nothing computed is lost to a rerun with other settings (an upgrade's, or a mistaken --set): the
    complete stage waits aside while the new one runs; a stop leaves it there, and the old settings get
    it back without recomputing. Once the new output completes, the old one goes."""
    import pyarrow as pa
    import pytest

    from titok.runstate import REPLACED, run_stage

    run = RunDir(tmp_path)
    old = {"upstream": "", "fields": {"labels": {"max_new_tokens": 96}}}
    new = {"upstream": "", "fields": {"labels": {"max_new_tokens": 128}}}
    made = run_stage(run, "labels", "fp-old", lambda: pa.table({"x": [1, 2]}), {}, settings=old)

    def stopped():
        raise KeyboardInterrupt  # Ctrl-C in the middle of the recomputation

    with pytest.raises(KeyboardInterrupt):
        run_stage(run, "labels", "fp-new", stopped, {}, settings=new)
    assert "recomputing it: changed since it completed: labels.max_new_tokens 96 -> 128" in capsys.readouterr().err
    assert (tmp_path / f"labels{REPLACED}" / "_COMPLETE.json").is_file()

    timings = {}
    again = run_stage(run, "labels", "fp-old", lambda: pytest.fail("recomputed what was set aside"), timings, settings=old)
    assert timings["labels"]["status"] == "cached" and again.equals(made)
    assert "put back the output these settings made" in capsys.readouterr().err
    assert not (tmp_path / f"labels{REPLACED}").exists()

    run_stage(run, "labels", "fp-new", lambda: pa.table({"x": [3]}), {}, settings=new)
    assert not (tmp_path / f"labels{REPLACED}").exists()  # the new output is complete: the old one goes
    assert run.is_complete("labels", "fp-new")
