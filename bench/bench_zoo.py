"""Zoo migration vs one transplant per adapter: wall-clock and model loads, same machine, same run.

    python bench/bench_zoo.py [--rounds N]     # writes bench/results/zoo.json (about 9 min a round on 2 cores)

Four source LoRAs on SmolLM2-135M-Instruct (seeded random weights: the benchmark measures work, not
quality), two per task (boolean_expressions, object_counting), moved to Gemma-3-270M (another
tokenizer). Four separate ``titok transplant`` runs and one ``titok migrate`` of the same four
adapters with the same settings (release gate off: the separate runs evaluate nothing), each in a
fresh folder, the zoo between the separate runs (``ORDER``). ``wall_ratio`` = zoo wall-clock / sum
of the separate runs' wall-clock (the median over ``--rounds``).
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ADAPTERS = {"bool-1": "boolean_expressions", "bool-2": "boolean_expressions",
            "count-1": "object_counting", "count-2": "object_counting"}
DEFAULTS = {"engine": {"actors": 1, "cpus_per_actor": 2, "batch_size": 16, "max_length": 256},
            "queries": {"few_shot": 3, "pool_size": 16, "max_new_tokens": 32, "rouge_l_max": 0.85},
            "labels": {"max_new_tokens": 48}, "filter": {"top_m": 8, "k": 0.7},
            "train": {"workers": 2, "epochs": 2, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3}}


def make_adapters(root: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model

    from titok.models import load_model, resolve_model_path

    paths = {}
    for seed, name in enumerate(ADAPTERS):
        path = root / "sources" / name
        if not (path / "adapter_model.safetensors").is_file():
            torch.manual_seed(seed)
            model = get_peft_model(load_model("smollm2-135m"), LoraConfig(
                r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
            for name_, param in model.named_parameters():
                if "lora_B" in name_:
                    torch.nn.init.normal_(param, std=0.02)  # a non-trivial expert, not gibberish
            model.save_pretrained(path)
            config = json.loads((path / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = resolve_model_path("smollm2-135m")
            (path / "adapter_config.json").write_text(json.dumps(config))
        paths[name] = str(path)
    return paths


def loads(root: Path) -> dict:
    from titok.runstate import EVENTS_DIR, read_events

    events = [e for path in root.rglob(EVENTS_DIR) for e in read_events(path.parent)]
    model_loads = [e for e in events if e.get("event") == "model_load"]
    return {"source_engine": sum(e["stage"] == "engine" for e in model_loads),
            "train_workers": sum(e["stage"] == "train" for e in model_loads)}


def main() -> None:
    import argparse

    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="repeat the comparison; wall_ratio is their median")
    rounds = parser.parse_args().rounds
    work = REPO / "runs" / "bench-zoo"
    sources = make_adapters(work)
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    measured = [one_round(work, sources) for _ in range(rounds)]
    last = measured[-1]
    result = {
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
        "setup": {"adapters": ADAPTERS, "source": "smollm2-135m", "target": "gemma3-270m", "defaults": DEFAULTS,
                  "order": ORDER},
        "separate": last["separate"], "zoo": last["zoo"],  # the last round in full
        "rounds": [{"separate_seconds": r["separate"]["seconds"], "zoo_seconds": r["zoo"]["seconds"],
                    "wall_ratio": r["wall_ratio"]} for r in measured],
        "wall_ratio": round(statistics.median(r["wall_ratio"] for r in measured), 3),
        "target": "wall_ratio <= 0.5",
    }
    out = REPO / "bench" / "results" / "zoo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("wall_ratio", "rounds")}))
    print(f"wrote {out}")


# The zoo runs between the separate runs: a machine whose speed drifts during the benchmark (seen
# here: the same stage 20% slower ten minutes later) then biases neither side.
ORDER = ["separate bool-1", "separate count-1", "zoo", "separate bool-2", "separate count-2"]


def one_round(work: Path, sources: dict[str, str]) -> dict:
    from titok.config import load_config
    from titok.workflows.pipeline import transplant
    from titok.workflows.zoo import load_manifest, migrate

    for folder in ("separate", "zoo"):
        shutil.rmtree(work / folder, ignore_errors=True)
    separate, zoo = {}, {}
    for step in ORDER:
        if step == "zoo":
            manifest = load_manifest(None, [
                "source_base=smollm2-135m", "target_base=gemma3-270m", f"out_dir={work / 'zoo'}", "gate.enabled=false",
                f"defaults={json.dumps(DEFAULTS)}",
                "adapters=" + json.dumps([{"name": n, "path": sources[n], "task": t} for n, t in ADAPTERS.items()])])
            started = time.perf_counter()
            record = migrate(manifest)
            zoo = {"seconds": round(time.perf_counter() - started, 1), "model_loads": loads(work / "zoo"),
                   "stages": {row["name"]: row.get("stage_seconds") for row in record["adapters"]},
                   "shared_passes": record["shared_passes"]}
            assert all(row["status"] == "migrated" for row in record["adapters"]), record["adapters"]
            print(f"zoo: {zoo['seconds']} s", flush=True)
            continue
        name = step.split()[1]
        cfg = load_config(**DEFAULTS, source_base="smollm2-135m", target_base="gemma3-270m", source_adapter=sources[name],
                          task=ADAPTERS[name], run_dir=str(work / "separate" / name))
        started = time.perf_counter()
        result = transplant(cfg)
        separate[name] = {"seconds": round(time.perf_counter() - started, 1),
                          "stages": {k: v.get("seconds") for k, v in result["stages"].items()}}
        print(f"separate {name}: {separate[name]['seconds']} s", flush=True)
    total = round(sum(v["seconds"] for v in separate.values()), 1)
    return {"separate": {"runs": separate, "seconds": total, "model_loads": loads(work / "separate")}, "zoo": zoo,
            "wall_ratio": round(zoo["seconds"] / total, 3)}


if __name__ == "__main__":
    main()
