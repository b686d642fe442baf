"""What an lr search decided, read from a run directory's event logs: each ``lr_chosen`` event (the rate
kept, every rate's final validation loss, its share of held-out answers that end, how they spread
against the expert's and the rates ruled out) and each check of a kept rate (``train_done`` with ``checked_only``: the validation loss recomputed
from the loaded LoRA beside the recorded one, and its seconds), rank 0's, oldest first.

    python bench/lr_events.py runs/bool-ends/runs/boolean_expressions/seed0/gemma3-270m \\
        runs/bool-ends/runs/boolean_expressions/seed1/gemma3-270m --json checks.json

Written by hand: it reads titok's own event logs (``titok.runstate.read_events``) under every method's folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_events(run_dir: Path) -> dict:
    """The lr search's decisions and kept-rate checks of one run directory (all its methods)."""
    from titok.runstate import EVENTS_DIR, read_events

    events = sorted((e for log in run_dir.rglob(EVENTS_DIR) for e in read_events(log.parent)), key=lambda e: e["time"])
    chosen = [{"lr": e["lr"], "val_loss": {rate: curve[-1] if curve else None for rate, curve in e["val_losses"].items()},
               "answers_end": e.get("answers_end"), "answers_spread": e.get("answers_spread"),
               "ruled_out": e.get("ruled_out")}
              for e in events if e["event"] == "lr_chosen"]
    checks = [{k: e[k] for k in ("val_loss", "recorded_val_loss", "seconds")}
              for e in events if e["event"] == "train_done" and e.get("checked_only") and e["rank"] == 0]
    return {"lr_chosen": chosen, "checks": checks}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args()
    result = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                          "processor": platform.processor()},
              "runs": {str(run_dir): run_events(run_dir) for run_dir in args.run_dirs}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
