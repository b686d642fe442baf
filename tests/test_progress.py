"""Progress a person can read: one line per stage, fed by the actors, and none of Ray's repeated lines."""

import io
import re
import time

from titok import progress

STAGE_LINE = re.compile(r"^\[(queries|labels|scores|filter|align|train)\] ")


def test_a_stage_in_a_log_is_one_line_with_its_count_rate_and_note():
    log = io.StringIO()  # not a terminal: no redraws
    with progress.stage("labels", log) as bar:
        bar.start(12)
        for _ in range(3):
            bar.update(4)
        bar.add_note("12 are rescored")
    with progress.stage("filter", log) as bar:
        bar.add_note("6 rows")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\[labels\] 12/12 rows 100% \[00:00<00:00, +[\d.]+ rows/s\], 12 are rescored", lines[0]), lines[0]
    assert re.fullmatch(r"\[filter\] done in 0\.\d s, 6 rows", lines[1]), lines[1]


def test_a_long_stage_in_a_log_says_where_it_is_every_interval(monkeypatch):
    monkeypatch.setattr(progress, "_LOG_INTERVAL_S", 0.2)
    log = io.StringIO()
    with progress.stage("train", log) as bar:
        bar.start(4, "steps")
        for step in range(1, 5):
            time.sleep(0.25)
            bar.set(step, loss=f"{10 - step:.4f}")
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 5 and len(set(lines)) == len(lines), lines
    assert all(line.startswith("[train] ") for line in lines)
    assert lines[-1].startswith("[train] 4/4 steps 100%") and lines[-1].endswith("loss 6.0000")


def test_each_job_of_a_worker_group_gets_its_own_steps_on_the_line(monkeypatch):
    """A zoo's group (or an lr search) trains job after job: the second job's steps are drawn too,
    not only the first's (tqdm draws only past the count it last drew)."""
    from titok.train.ray_train import _show_step

    monkeypatch.setattr(progress, "_LOG_INTERVAL_S", 0.05)
    log = io.StringIO()
    with progress.stage("train", log) as bar:
        for job in ("a", "b"):
            for step in range(1, 4):
                time.sleep(0.08)
                _show_step(bar, (job, step, 3, 1.0 / step))
        before_close = log.getvalue().splitlines()
    second = [line.split()[1] for line in before_close if "adapter b" in line]
    assert "2/3" in second and second[-1] == "3/3", before_close  # drawn as it goes, not only by close()


def test_a_training_line_names_the_rate_an_lr_search_is_on_and_a_zoos_adapter():
    from titok.train.ray_train import _show_step

    log = io.StringIO()
    with progress.stage("train", log) as bar:
        _show_step(bar, ("default@lr0.003", 2, 2, 0.5))
        _show_step(bar, ("lawyer@lr1e-05", 2, 2, 0.25))
    lines = log.getvalue().splitlines()
    assert lines[-1].endswith("loss 0.2500, adapter lawyer, lr 1e-05"), lines
    assert "adapter default" not in log.getvalue()
    with progress.stage("train", log) as bar:  # a kept rate answering the held-out queries, not training
        _show_step(bar, ("lawyer@lr0.01:check", 1, 1, None))
    line = log.getvalue().splitlines()[-1]
    assert line.startswith("[train] 1/1 checks") and line.endswith(
        "checking held-out answers of a kept rate, adapter lawyer, lr 0.01"), line


def test_workers_feed_the_drivers_line_through_an_actor(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def worker(feed, steps):
        for step in range(1, steps + 1):
            pushed = feed.push.remote(("default", step, steps, 1.0 / step))
        ray.get(pushed)  # a worker waits for its last push (titok.train.ray_train does), so none is lost

    log, seen = io.StringIO(), []
    with progress.stage("train", log) as bar:
        with progress.watch_feed(lambda item: (seen.append(item), bar.start(item[2], "steps") if item[1] == 1 else None,
                                               bar.set(item[1], loss=f"{item[3]:.2f}"))) as feed:
            ray.get(worker.remote(feed, 5))
    assert [item[1] for item in seen] == [1, 2, 3, 4, 5]
    assert log.getvalue().splitlines()[-1].startswith("[train] 5/5 steps 100%")
    assert log.getvalue().splitlines()[-1].endswith("loss 0.20")


def assert_one_line_per_stage(output: str, pool: int) -> None:
    """A transplant's output as a person reads it (test_cluster's `ray job submit` run, a small run on
    a token-authenticated head): each stage one line, Ray's per-dataset lines, worker chatter and the
    token notice gone, the loss only on the train stage's line. A stage longer than the log interval
    (30 s: a slow or busy machine) writes a line per interval, so a stage's lines are counted as one."""
    stage_lines = [line for line in output.splitlines() if STAGE_LINE.match(line)]
    names = [STAGE_LINE.match(line).group(1) for line in stage_lines]
    assert [name for i, name in enumerate(names) if i == 0 or name != names[i - 1]] == \
        ["queries", "labels", "scores", "filter", "align", "train"], stage_lines
    last_queries_line = stage_lines[names.count("queries") - 1]
    assert re.match(rf"\[queries\] {pool}/{pool} queries 100%", last_queries_line), last_queries_line
    assert re.match(r"\[train\] \d+/\d+ steps 100% .*loss \d+\.\d{4}$", stage_lines[-1]), stage_lines[-1]
    for noise in ("execution finished", "Running Dataset", "RayTrainWorker", "TrainController", "Token authentication",
                  "Progress bars disabled", "UserWarning", "is deprecated", "Loading weights", "Started a local Ray"):
        assert noise not in output, noise
    assert output.count("loss") == names.count("train"), output
