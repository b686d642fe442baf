"""What a zoo migration hands over: the migrated adapters with provenance, the release gate, the
summaries and a vLLM serving config.

Release gate (per adapter, on held-out examples of its task; one evaluation pass per base and task,
adapters switched): the task's metric (exact match; ROUGE-L for free-text tasks) for the source
expert (source base + adapter), the vanilla target and the migrated target. The adapter passes when
the expert beats vanilla and the migrated target keeps at least ``gate.min_retained`` of that gain:
``(migrated - vanilla) >= min_retained x (expert - vanilla)``. An expert that does not beat vanilla
has nothing to keep: such an adapter does not pass (its row says why).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

from titok.layout import adapter_digest, file_digest
from titok.runstate import ADAPTER_CONFIG

__all__ = ["SERVE_CONFIG", "gate_and_write", "gate_rule", "provenance", "serve_config", "write_serving_files"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")


def gate_rule(expert: float, vanilla: float, migrated: float, min_retained: float,
              majority_rate: float | None = None, collapse: str | None = None) -> tuple[bool, float | None, str]:
    """``(passed, retained share of the expert's gain, why)``.

    ``majority_rate`` (exact match on a closed answer set: the score of always giving the most common
    answer): an expert that does not beat it shows no skill, so whatever the target keeps of its
    "gain" is no evidence, and the adapter does not pass. ``collapse`` (``metrics.collapse_text`` of a
    migrated adapter that gives one answer to nearly everything): refused whatever its accuracy.
    """
    gain = expert - vanilla
    if collapse:
        return False, (migrated - vanilla) / gain if gain > 0 else None, collapse
    if gain <= 0:
        return False, None, f"the expert ({expert:.3f}) does not beat the vanilla target ({vanilla:.3f}): nothing to retain"
    retained = (migrated - vanilla) / gain
    if majority_rate is not None and expert <= majority_rate:
        return False, retained, (f"the expert ({expert:.3f}) does not beat the majority rate ({majority_rate:.3f}, always "
                                 "the most common answer): no skill to retain")
    passed = retained >= min_retained - 1e-9  # a share computed from rates: 0.3 / 0.6 must count as 0.5
    return passed, retained, f"{'keeps' if passed else 'keeps only'} {retained:.0%} of the expert's gain (needs {min_retained:.0%})"


def _model_fingerprint(spec: str, trust_remote_code: bool) -> dict:
    from titok.models import folder_chat_template, load_tokenizer, resolve_model_path

    path = Path(resolve_model_path(spec))
    record = {"spec": spec, "path": str(path)}
    if (path / "config.json").is_file():
        record["config_sha256"] = file_digest(path / "config.json")
        tokenizer = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            if (path / name).is_file():
                tokenizer.update(name.encode() + (path / name).read_bytes())
        record["tokenizer_sha256"] = tokenizer.hexdigest()[:16]
    template = folder_chat_template(path) or load_tokenizer(spec, trust_remote_code).chat_template or ""
    record["chat_template_sha256"] = hashlib.sha256(str(template).encode()).hexdigest()[:16]
    return record


def _stage_digest(run_root: Path, stages: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for stage in stages:
        for path in sorted((run_root / stage).glob("*.parquet")):
            digest.update(stage.encode() + file_digest(path, 64).encode())
    return digest.hexdigest()[:16]


def provenance(cfg, run_root: Path, bases: dict | None = None) -> dict:
    """Where a migrated adapter came from, enough to tell whether two of them can differ. ``bases``:
    the base models' fingerprints already taken (a zoo shares two bases; each takes seconds)."""
    bases = bases if bases is not None else {}
    for spec in (cfg.source_base, cfg.target_base):
        if spec not in bases:
            bases[spec] = _model_fingerprint(spec, cfg.trust_remote_code)
    source = Path(cfg.source_adapter)
    return {
        "titok_version": importlib.metadata.version("titok"),
        "source_adapter": {"path": str(source), "weights_sha256": adapter_digest(source),
                           "config_sha256": file_digest(source / ADAPTER_CONFIG)},
        "source_base": bases[cfg.source_base],
        "target_base": bases[cfg.target_base],
        "synthetic_data_sha256": _stage_digest(run_root, ("queries", "labels", "scores")),
        "training_data_sha256": _stage_digest(run_root, ("filter", "align")),
        "config": cfg.model_dump(),
    }


SERVE_CONFIG = "serve.yaml"


def serve_config(model: str, adapters: dict[str, str], max_rank: int, max_loras: int,
                 chat_template: str | None) -> dict:
    """``vllm serve --config`` YAML as a dict: the target, every adapter as a LoRA module (name=path,
    paths relative to the zoo folder), ``max-loras`` adapters in one batch (GPU slots), ``max-cpu-loras``
    = the zoo (every adapter stays in host memory, none is reloaded from disk), the rank vLLM must
    allow, and the chat template the adapters were trained with."""
    from titok.gpu_facts import vllm_lora_rank

    config = {"model": model, "enable-lora": True, "max-loras": max(1, min(max_loras, len(adapters))),
              "max-cpu-loras": max(1, len(adapters)), "max-lora-rank": vllm_lora_rank(max_rank),
              "lora-modules": [f"{name}={path}" for name, path in adapters.items()]}
    if chat_template:
        config["chat-template"] = chat_template
    return config


def write_serving_files(out: Path, model: str, adapters: dict[str, str], max_rank: int, max_loras: int) -> None:
    """``serve.yaml`` (vLLM's own config-file form, every setting of the server) and ``serve.sh`` that
    serves it from the zoo folder, so the folder can move: adapter paths in it are relative."""
    import yaml

    from titok.export import CHAT_TEMPLATE_FILE

    relative = {name: str(Path(path).resolve().relative_to(out.resolve())) for name, path in adapters.items()}
    template = next((f"{path}/{CHAT_TEMPLATE_FILE}" for path in relative.values() if (out / path / CHAT_TEMPLATE_FILE).is_file()), None)
    config = serve_config(model, relative, max_rank, max_loras, template)
    (out / SERVE_CONFIG).write_text(
        "# vllm serve --config serve.yaml, from this folder (serve.sh does): every migrated adapter by name.\n"
        "# max-loras: adapters in one batch (each is a GPU slot of max-lora-rank); max-cpu-loras: kept in host memory.\n"
        + yaml.safe_dump(config, sort_keys=False))
    (out / "lora-modules.json").unlink(missing_ok=True)  # what older titok wrote: vLLM takes no such file
    script = out / "serve.sh"
    script.write_text("#!/usr/bin/env bash\n# Serve the migrated adapters with vLLM (one base, every adapter by name); "
                      "extra arguments go to vllm serve.\n"
                      f'cd "$(dirname "$0")" && exec vllm serve --config {SERVE_CONFIG} "$@"\n')
    script.chmod(0o755)


def _metric(task: str, split_seed: int) -> str:
    from titok.tasks import load_task

    return "rougeL" if load_task(task, seed=split_seed).metric == "rouge" else "exact_match"


def _gate(manifest, configs: dict, rows: dict, out: Path) -> None:
    from titok.config import EvalSettings
    from titok.workflows.evaluate import cached_evaluation
    from titok.core.metrics import collapse_text, collapsed
    from titok.layout import short_name

    gate = EvalSettings(**manifest.gate.model_dump(include=set(EvalSettings.model_fields)))  # the eval cache's key
    groups: dict[tuple[str, int], list[str]] = {}
    for name, row in rows.items():
        if row["status"] == "migrated":
            groups.setdefault((row["task"], configs[name].split_seed), []).append(name)
    for (task, split), names in groups.items():
        metric = _metric(task, split)
        folder = out / "evals" / f"{short_name(task)}-split{split}"
        engine = configs[names[0]].engine  # shared by every adapter of the zoo
        experts = cached_evaluation(gate, split, folder / "source.json", manifest.source_base,
                                    {n: rows[n]["source_adapter"] for n in names}, task, engine)
        targets = cached_evaluation(gate, split, folder / "target.json", manifest.target_base,
                                    {"vanilla": None, **{n: rows[n]["adapter"] for n in names}}, task, engine)
        for name in names:
            scores = {"expert": experts[name], "vanilla": targets["vanilla"], "migrated": targets[name]}
            floor = targets[name]["majority_rate"] if metric == "exact_match" else None
            passed, retained, why = gate_rule(scores["expert"][metric], scores["vanilla"][metric],
                                              scores["migrated"][metric], manifest.gate.min_retained, floor,
                                              collapse_text(targets[name]) if collapsed(targets[name]) else None)
            rows[name]["gate"] = {
                "metric": metric, "n": targets[name]["n"], "passed": passed, "retained": retained, "why": why,
                **{f"{who}_{m}": report[m] for who, report in scores.items()
                   for m in ("exact_match", "option_accuracy", "rougeL") if m in report},
                "majority_rate": targets[name]["majority_rate"]}


def _summary_rows(rows: dict) -> list[dict]:
    table = []
    for row in rows.values():
        gate = row.get("gate") or {}
        metric = gate.get("metric", "")
        table.append({"adapter": row["name"], "task": row["task"], "status": row["status"],
                      "failed_stage": row.get("stage", "") if row["status"] == "failed" else "",
                      "kept_samples": row.get("train_rows", ""), "first_loss": row.get("first_loss", ""),
                      "last_loss": row.get("loss", ""), "metric": metric,
                      "expert": gate.get(f"expert_{metric}", ""), "vanilla": gate.get(f"vanilla_{metric}", ""),
                      "migrated": gate.get(f"migrated_{metric}", ""), "majority_rate": gate.get("majority_rate", ""),
                      "retained": "" if gate.get("retained") is None else round(gate["retained"], 3),
                      "gate": "" if not gate else ("pass" if gate["passed"] else "fail"),
                      "reason": row.get("reason") or gate.get("why", ""),
                      "seconds": round(sum(v for v in (row.get("stage_seconds") or {}).values() if v), 1)})
    return table


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def gate_and_write(manifest, configs: dict, rows: dict, runners: dict, out: Path, seconds: float,
                   shared: list[dict] = ()) -> dict:
    """Copy the migrated adapters out with provenance, run the gate, write zoo.json, the summaries and
    the serving file; returns the zoo record. ``shared``: the passes that served several adapters at
    once (stage, adapters, seconds); their time is in no adapter's stage seconds."""
    from titok.models import resolve_model_path

    adapters_dir = out / "adapters"
    bases: dict = {}  # fingerprinted once for all adapters
    for name, row in rows.items():
        if row["status"] != "migrated":
            continue
        runner = runners[name]
        summary = runner.run.summary("train")
        metrics = summary.get("metrics", {})
        row.update(train_rows=summary.get("rows"), first_loss=metrics.get("first_loss"), loss=metrics.get("loss"))
        final = adapters_dir / name
        staging = adapters_dir / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(runner.adapter_path, staging)
        (staging / "provenance.json").write_text(json.dumps(provenance(configs[name], runner.run.root, bases), indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the old copy goes only once the new one is whole
        row["adapter"] = str(final)
    if manifest.gate.enabled:
        _gate(manifest, configs, rows, out)
    migrated = {n: r["adapter"] for n, r in rows.items() if r["status"] == "migrated"}
    write_serving_files(out, resolve_model_path(manifest.target_base), migrated,
                        max([configs[n].train.lora.rank for n in migrated] or [8]), manifest.serving.max_loras)
    from titok.runstate import RunDir

    stages = [e.get("stage") for e in RunDir(out).events() if e.get("event") == "model_load"]
    loads = {"source_engines": stages.count("engine"), "training_workers": stages.count("train")}  # over every job on out
    record = {"source_base": manifest.source_base, "target_base": manifest.target_base, "seconds": round(seconds, 1),
              "model_loads": loads, "shared_passes": list(shared), "adapters": list(rows.values()),
              "manifest": manifest.model_dump()}
    (out / "zoo.json").write_text(json.dumps(record, indent=2, default=str))
    table = _summary_rows(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    header = ["adapter", "task", "status", "kept_samples", "metric", "expert", "vanilla", "migrated", "majority_rate",
              "retained", "gate", "reason"]
    lines = [f"# Zoo migration: {manifest.source_base} -> {manifest.target_base}", "",
             f"{len(migrated)} of {len(rows)} adapters migrated, "
             f"{sum(1 for r in rows.values() if (r.get('gate') or {}).get('passed'))} pass the release gate "
             f"(min_retained {manifest.gate.min_retained:g}); model loads: source engines {loads['source_engines']}, "
             f"training workers {loads['training_workers']}; {seconds / 60:.1f} min.", "",
             *(["Shared passes (seconds in no adapter's row): " + "; ".join(
                 f"{p['stage']} {p['seconds']} s for {', '.join(p['adapters'])}" for p in shared) + ".", ""] if shared else []),
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(row[h]) for h in header) + " |" for row in table]
    lines += ["", "Fit to ship: the rows whose gate is `pass`. `serve.sh` (`vllm serve --config serve.yaml`) serves every "
                  "migrated adapter with vLLM; `adapters/<name>/provenance.json` says what each was made from."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return record
