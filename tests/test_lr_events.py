"""bench/lr_events.py reads an lr search's decisions and kept-rate checks back from titok's own event logs."""

import importlib.util
import sys
from pathlib import Path

from titok.runstate import RunDir

_SPEC = importlib.util.spec_from_file_location("lr_events", Path(__file__).parents[1] / "bench" / "lr_events.py")
lr_events = sys.modules["lr_events"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lr_events)


SPREAD = {"top": "yes", "share": 0.625, "expert_share": 0.5625, "collapsed": False}


def test_the_searches_and_rank_zeros_checks_of_every_method_oldest_first(tmp_path):
    run, kd = RunDir(tmp_path), RunDir(tmp_path / "kd")  # titok's events at the root, kd's in its folder
    kd.log_event(event="train_done", stage="train", rank=0, seconds={"steps": 3.0})  # a training, not a check
    for rank in (1, 0):
        kd.log_event(event="train_done", stage="train", rank=rank, checked_only=True, val_loss=0.25,
                     recorded_val_loss=0.25, seconds={"answers": 20.0 + rank})
    kd.log_event(event="lr_chosen", stage="train", lr=0.003, val_losses={"0.001": [0.3, 0.28], "0.003": [0.26, 0.24]},
                 answers_end={"0.001": 0.6875, "0.003": 0.90625}, answers_spread={"0.003": SPREAD}, ruled_out=["0.001"])
    run.log_event(event="lr_chosen", stage="train", lr=0.01, val_losses={"0.01": [0.2], "0.1": []})  # before the check
    assert lr_events.run_events(tmp_path) == {
        "lr_chosen": [{"lr": 0.003, "val_loss": {"0.001": 0.28, "0.003": 0.24},
                       "answers_end": {"0.001": 0.6875, "0.003": 0.90625}, "answers_spread": {"0.003": SPREAD},
                       "ruled_out": ["0.001"]},
                      {"lr": 0.01, "val_loss": {"0.01": 0.2, "0.1": None}, "answers_end": None, "answers_spread": None,
                       "ruled_out": None}],
        "checks": [{"val_loss": 0.25, "recorded_val_loss": 0.25, "seconds": {"answers": 20.0}}]}
