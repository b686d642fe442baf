"""End to end on local Ray with tiny models over the real SmolLM2 and Gemma-3 tokenizers: a run
stopped in training, its resume to the adapter of an uninterrupted run, and a rerun that does no model
work; baselines and target-aware selection on the uninterrupted run's scored data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml
from peft import PeftModel
from rouge_score import rouge_scorer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from titok import columns as C
from titok.models import load_tokenizer
from titok.workflows.pipeline import transplant, transplant_together
from titok.core.sequences import token_matrix
from titok.runstate import EVENTS_DIR, RunDir
from titok.core.select import keep_count
from titok.core.sequences import encode_response
from titok.tasks import load_task
from tests.conftest import tiny_transplant_config

REPO = Path(__file__).resolve().parents[1]


def _stage(run_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / name).sort_values(C.SAMPLE_ID).reset_index(drop=True)


def _stop_in_training(config_path: Path, run_dir: Path) -> None:
    """``titok transplant`` stopped by SIGTERM (what Kubernetes and ``ray job stop`` send) inside training."""
    process = subprocess.Popen([sys.executable, "-m", "titok.cli", "transplant", "--config", str(config_path)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    deadline = time.time() + 600
    while not (run_dir / "train" / "_STARTED.json").is_file():
        assert process.poll() is None, "the run ended before training: " + process.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not start in 10 minutes"
        time.sleep(0.2)
    time.sleep(3)  # Ray Train's workers are up and stepping
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert not (run_dir / "train" / "_COMPLETE.json").exists()


@pytest.mark.slow
def test_transplant_stopped_in_training_resumes_to_the_uninterrupted_adapter(tiny_model_dirs, tmp_path, uninterrupted,
                                                                           local_ray):
    run_dir = tmp_path / "run"
    cfg = tiny_transplant_config(tiny_model_dirs, run_dir)
    config_path = tmp_path / "transplant.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump()))

    _stop_in_training(config_path, run_dir)
    loads_before_resume = RunDir(run_dir).events()
    # queries, labels and scores (every query-writing round too) ran on the same engine: one load per actor
    assert [e["stage"] for e in loads_before_resume if e["event"] == "model_load"
            and e["stage"] != "train"] == ["engine"] * cfg.engine.actors
    # a process killed mid-write leaves half a line: the resumed run reads past it (a warning, not a failure)
    with open(sorted((run_dir / EVENTS_DIR).glob("*.jsonl"))[-1], "a") as f:
        f.write('{"time": 1e18, "event": "model_lo')

    result = transplant(cfg)
    status = {name: info["status"] for name, info in result["stages"].items()}
    assert status == {"queries": "cached", "labels": "cached", "scores": "cached", "filter": "cached",
                      "align": "cached", "train": "ran", "export": "ran"}
    new_loads = [e for e in RunDir(run_dir).events()[len(loads_before_resume):] if e["event"] == "model_load"]
    assert {e["stage"] for e in new_loads} == {"train"}  # nothing before the cut ran again
    assert len(new_loads) == 2  # one per DeepSpeed worker
    resumed = load_file(Path(result["adapter"]) / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted["weights"].keys()
    for name, tensor in resumed.items():  # the stop changed nothing the run makes
        torch.testing.assert_close(tensor, uninterrupted["weights"][name], atol=1e-5, rtol=1e-4, msg=name)

    # --- every stage's content ---
    task = load_task("boolean_expressions", seed=cfg.seed)
    queries = _stage(run_dir, "queries")
    assert len(queries) == cfg.pool_size == 12 and queries[C.SAMPLE_ID].is_unique
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    texts = list(queries[C.QUERY])
    seeds = [e["input"] for e in task.seed_examples]
    for i, text in enumerate(texts):
        assert text.strip()
        for other in texts[:i] + seeds:
            assert scorer.score(other, text)["rougeL"].fmeasure < 0.7

    labels = _stage(run_dir, "labels")
    assert list(labels[C.SAMPLE_ID]) == list(queries[C.SAMPLE_ID]) and labels[C.RESPONSE].map(type).eq(str).all()

    scores = _stage(run_dir, "scores")
    source_tok = load_tokenizer(tiny_model_dirs["source"])
    for _, row in scores.iterrows():
        ids, offsets = encode_response(source_tok, row[C.RESPONSE])
        assert list(row[C.TOKEN_IDS]) == ids and row[C.N_TOKENS] == len(ids)
        assert list(row[C.OFFSET_ENDS]) == [end for _, end in offsets]
        np.testing.assert_allclose(row[C.EXCESS], np.asarray(row[C.EXPERT_LOGPROBS]) - np.asarray(row[C.AMATEUR_LOGPROBS]), atol=1e-6)
        if len(ids):
            assert row[C.SAMPLE_SCORE] == pytest.approx(float(np.mean(row[C.EXCESS])))

    kept = _stage(run_dir, "filter")
    assert len(kept) == cfg.filter.top_m
    best = scores.sort_values([C.SAMPLE_SCORE, C.SAMPLE_ID], ascending=[False, True]).head(cfg.filter.top_m)
    assert set(kept[C.SAMPLE_ID]) == set(best[C.SAMPLE_ID])
    assert kept[C.SAMPLE_SCORE].min() >= scores.loc[~scores[C.SAMPLE_ID].isin(kept[C.SAMPLE_ID]), C.SAMPLE_SCORE].max()
    for _, row in kept.iterrows():
        keep = np.asarray(row[C.KEEP], dtype=bool)
        assert keep.sum() == keep_count(row[C.N_TOKENS], cfg.filter.k)
        excess = np.asarray(row[C.EXCESS])
        if keep.any() and (~keep).any():
            assert excess[keep].min() >= excess[~keep].max()

    aligned = _stage(run_dir, "align")
    target_tok = load_tokenizer(tiny_model_dirs["target"])
    for _, row in aligned.iterrows():
        weights = np.asarray(row[C.TARGET_WEIGHTS])
        assert len(weights) == len(encode_response(target_tok, row[C.RESPONSE])[0]) == len(row[C.TARGET_TOKEN_IDS])
        assert ((weights >= 0) & (weights <= 1)).all()

    train = RunDir(run_dir).summary("train")
    assert np.isfinite(train["metrics"]["loss"]) and np.isfinite(train["metrics"]["first_loss"])

    adapter = Path(result["adapter"])
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                         "chat_template.jinja", "titok.json"]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "target"  # the folder's name, never this machine's path
    target = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["target"]), adapter)
    lora_b = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained away from the zero init
    ids = target_tok("True and False is", return_tensors="pt").input_ids
    assert torch.isfinite(target(ids).logits).all()
    card = json.loads((adapter / "titok.json").read_text())
    assert card["top_m"] == cfg.filter.top_m and card["k"] == cfg.filter.k

    # --- a rerun of the finished run does no model work ---
    events_before, weights = len(RunDir(run_dir).events()), (adapter / "adapter_model.safetensors").read_bytes()
    rerun = transplant(cfg)
    assert all(info["status"] == "cached" for name, info in rerun["stages"].items() if name != "export")
    assert len(RunDir(run_dir).events()) == events_before
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights


@pytest.mark.slow  # it reads the uninterrupted run (a whole transplant)
def test_labels_stream_into_the_scores_the_scores_stage_would_make(tiny_model_dirs, tmp_path, local_ray, uninterrupted):
    """Each labelled batch is scored on its engine at once (the uninterrupted run's labels and scores);
    the rows equal those of a scores stage run from the persisted labels (what a run stopped after
    labels, then resumed, does), on the same queries."""
    from titok.layout import share_stages

    streamed, staged = uninterrupted["run_dir"], tmp_path / "staged"
    share_stages(streamed, staged, ("queries",))
    config = tiny_transplant_config(tiny_model_dirs, staged)
    assert transplant(config, until="labels")["stages"]["queries"]["status"] == "cached"  # nothing to stream into
    resumed = transplant(config, until="scores")
    assert resumed["stages"]["labels"]["status"] == "cached" and resumed["stages"]["scores"]["status"] == "ran"
    for run_dir, expected in ((streamed, [True]), (staged, [False])):
        assert [e["streamed_into_scores"] for e in RunDir(run_dir).events()
                if e["event"] == "expert_logprobs_from_generation"] == expected
    for stage in ("labels", "scores"):
        a, b = _stage(streamed, stage), _stage(staged, stage)
        assert list(a.columns) == list(b.columns) and len(a) == len(b) == config.pool_size
        for column in a.columns:
            for x, y in zip(a[column], b[column]):
                if isinstance(x, str) or np.isscalar(x):
                    assert x == y or (x != x and y != y), column  # NaN == NaN for empty responses' scores
                elif x is None or y is None:
                    assert x is None and y is None, column
                else:  # a list cell, or a list-of-lists cell (the expert's top-n at each token)
                    as_floats = token_matrix if len(x) and not np.isscalar(x[0]) else np.asarray
                    np.testing.assert_allclose(np.asarray(as_floats(x), np.float64), np.asarray(as_floats(y), np.float64),
                                               atol=1e-6, err_msg=column)


@pytest.mark.slow
def test_zero3_global_token_scope_and_an_lr_search_chosen_on_held_out_samples(tiny_model_dirs, tmp_path, local_ray,
                                                                              uninterrupted):
    """ZeRO-3 with the token filter over the whole pool, and two learning rates: each rate trains on
    its own worker group (ZeRO-3 binds the base to one engine) on the kept samples less the held-out
    one; the run's adapter is the rate with the lower validation loss, and its summary, events, card
    and the compare report say which rate won."""
    from titok.layout import share_stages
    from titok.workflows.pipeline import format_summary
    from titok.core.validation_split import ruled_out
    from titok.workflows.report import _learning_rates_text

    def searching(rates: str, *sets: str):
        return tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "filter.token_scope=global",
                                      "train.deepspeed_stage=3", "train.validation_fraction=0.2",
                                      f"train.lr_search={rates}", "train.epochs=2", *sets)

    cfg = searching("[1e-5, 3e-2]")
    share_stages(uninterrupted["run_dir"], tmp_path / "run")  # its queries, labels and scores: no engine work here
    result = transplant(cfg)
    assert [result["stages"][s]["status"] for s in ("queries", "labels", "scores")] == ["cached"] * 3
    kept = pd.read_parquet(tmp_path / "run" / "filter")
    total = int(kept[C.N_TOKENS].sum())
    assert sum(np.asarray(k, dtype=bool).sum() for k in kept[C.KEEP]) == keep_count(total, cfg.filter.k)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dirs["target"]), result["adapter"])

    train = result["train"]
    assert train == result["stages"]["train"] and train["rows"] == 6 and train["metrics"]["train_rows"] == 5 and np.isfinite(train["metrics"]["loss"])
    curves = train["lr_search"]
    assert set(curves) == {"1e-05", "0.03"} and all(len(c) == 2 and np.isfinite(c).all() for c in curves.values())
    # each rate answered the held-out query with the base gathered once on both ZeRO-3 ranks (one
    # rank's share: the one query); none ended clearly less often than the other, so the lower loss wins
    ends = train["lr_answers_end"]
    assert set(ends) == set(curves) and all(0.0 <= share <= 1.0 for share in ends.values())
    spreads = train["lr_answers_spread"]  # ... and their answers counted by the expert's (none collapsed here)
    assert set(spreads) == set(curves) and not any(s["collapsed"] for s in spreads.values())
    assert not ruled_out({float(lr): share for lr, share in ends.items()})
    chosen = min(curves, key=lambda lr: curves[lr][-1])
    assert train["metrics"]["lr"] == float(chosen) and train["val_losses"] == curves[chosen]
    events = RunDir(tmp_path / "run").events()
    assert [(e["lr"], e["answers_end"], e["answers_spread"], e["ruled_out"]) for e in events
            if e["event"] == "lr_chosen"] == [(float(chosen), ends, spreads, [])]
    assert sorted((e["queries"], e["base_gathered_once"]) for e in events if e["event"] == "held_out_answers") == \
        [(0, True), (0, True), (1, True), (1, True)]
    loads = [e for e in events if e["event"] == "model_load" and e["stage"] == "train"]
    assert sorted(e["adapters"][0] for e in loads) == ["default@lr0.03"] * 2 + ["default@lr1e-05"] * 2
    assert all(e["partitioned"] for e in loads)
    assert json.loads(Path(result["adapter"], "titok.json").read_text())["train_metrics"]["lr"] == float(chosen)
    assert f"train lr: {chosen}, the lowest validation loss of 1e-05: " in format_summary(result)
    assert format_summary(result).count("(answers end ") == 2
    table = _learning_rates_text({("boolean_expressions", "tiny", "titok", 0): train})
    assert "| boolean_expressions | tiny | titok | 0 |" in table and f"**{curves[chosen][-1]:.3f}, ends {ends[chosen]:.0%}**" in table

    # Widened: only the new rate trains; the two rates already tried come back with their curves and
    # checks. Without the answers check (it only picks a rate, so turning it off retrains nothing): the
    # new rate has no share, which rules nothing out (and spares the test a ZeRO-3 generation).
    seen = len(events)
    wider = transplant(searching("[1e-5, 1e-3, 3e-2]", "train.validation_generations=0"))
    assert wider["stages"]["train"]["status"] == "ran"
    new_loads = [e for e in RunDir(tmp_path / "run").events()[seen:] if e["event"] == "model_load"]
    assert [e["adapters"] for e in new_loads] == [["default@lr0.001"]] * 2
    assert {lr: wider["train"]["lr_search"][lr] for lr in curves} == curves
    assert wider["train"]["lr_answers_end"] == {**ends, "0.001": None} and wider["train"]["lr_answers_spread"] == spreads
    # Narrowed to the rate that did not win: nothing trains, and the adapter is that rate's own.
    other = next(lr for lr in curves if lr != chosen)
    seen = len(RunDir(tmp_path / "run").events())
    narrower = transplant(searching(f"[{other}]"))
    assert not [e for e in RunDir(tmp_path / "run").events()[seen:] if e["event"] == "model_load"]
    assert narrower["train"]["metrics"]["lr"] == float(other) and narrower["train"]["val_losses"] == curves[other]
    kept = next((tmp_path / "run" / "lr-rates").iterdir()) / f"lr{float(other):g}" / "adapter_model.safetensors"
    assert Path(narrower["adapter"], "adapter_model.safetensors").read_bytes() == kept.read_bytes()


def _model_loads_since(run_dir: Path, count: int) -> list[dict]:
    return [e for e in RunDir(run_dir).events() if e["event"] == "model_load"][count:]


@pytest.mark.slow
def test_baselines_and_target_aware_selection_reuse_the_scored_data(tiny_model_dirs, uninterrupted, local_ray):
    """kd, filter.reference=target_base and uld in TiTok's run dir, transplanted together as compare
    does: each reuses its queries, labels and scores, keeps its own filter/align/train/adapter, and
    leaves TiTok's adapter untouched; the three trainings share one worker group (the target loads
    once per worker, not once per method), and a fourth run whose loss diverges fails after the others
    have exported. With target_base the target base scores the kept samples, and the top-k% target
    tokens by (expert - target) over aligned spans are trained."""
    run_dir, titok = uninterrupted["run_dir"], uninterrupted["result"]
    titok_weights = Path(titok["adapter"], "adapter_model.safetensors").read_bytes()
    loads = len(_model_loads_since(run_dir, 0))
    methods = {"kd": ["filter.method=kd"], "titok:target_base": ["filter.reference=target_base"],
               "uld": ["filter.method=uld"]}
    cfgs = {name: tiny_transplant_config(tiny_model_dirs, run_dir, *sets) for name, sets in methods.items()}
    diverges = tiny_transplant_config(tiny_model_dirs, run_dir, "filter.method=top_m_only", "train.lr=1e30",
                                      "train.epochs=2")  # its second step sees the first one's update

    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        transplant_together([diverges, *cfgs.values()])
    # no source model again: the target base once for target_base's alignment, then one worker group
    # (two workers) for all four trainings
    assert [e["stage"] for e in _model_loads_since(run_dir, loads)] == ["align", "train", "train"]
    for name, folder in (("kd", "kd"), ("titok:target_base", "titok-target_base"), ("uld", "uld")):
        assert json.loads((run_dir / folder / "adapter" / "titok.json").read_text())["method"] == name
    assert not (run_dir / "top_m_only" / "adapter").exists() and not (run_dir / "trainings").exists()

    loads = len(_model_loads_since(run_dir, 0))
    kd, aware, uld = transplant_together(list(cfgs.values()))  # everything reused: nothing was lost
    assert _model_loads_since(run_dir, loads) == []
    status = {name: info["status"] for name, info in kd["stages"].items()}
    assert status == {"queries": "cached", "labels": "cached", "scores": "cached", "kd/filter": "cached",
                      "kd/align": "cached", "kd/train": "cached", "export": "ran"}
    assert kd["train"] == kd["stages"]["kd/train"]  # the method's own training, under its own key
    kept = pd.read_parquet(run_dir / "kd" / "filter")
    assert len(kept) == 12 and all(np.asarray(k, dtype=bool).all() for k in kept[C.KEEP])  # all samples, all tokens
    assert kd["adapter"] == str(run_dir / "kd" / "adapter")

    assert aware["adapter"] == str(run_dir / "titok-target_base" / "adapter")
    aligned = pd.read_parquet(run_dir / "titok-target_base" / "align")
    target_tok = load_tokenizer(tiny_model_dirs["target"])
    for _, row in aligned.iterrows():
        weights = np.asarray(row[C.TARGET_WEIGHTS])
        n = len(encode_response(target_tok, row[C.RESPONSE])[0])
        assert len(weights) == len(row[C.TARGET_LOGPROBS]) == n
        assert set(np.unique(weights)) <= {0.0, 1.0} and weights.sum() == keep_count(n, 0.7)
        assert (np.asarray(row[C.TARGET_LOGPROBS]) <= 0).all()
    assert json.loads(Path(aware["adapter"], "titok.json").read_text())["method"] == "titok:target_base"
    assert Path(titok["adapter"], "adapter_model.safetensors").read_bytes() == titok_weights

    # uld: kd's samples and tokens, plus the expert's top-n log-probs kept by labels, paired by span
    # a tiny random model's answers never re-tokenize to their own tokens: scoring's expert pass gives
    # every top-n here (generation's are checked in test_distill)
    scores = pd.read_parquet(run_dir / "scores")
    for _, row in scores[scores[C.N_TOKENS] > 0].iterrows():
        top = np.stack(row[C.EXPERT_TOP_LOGPROBS])
        assert top.shape == (len(row[C.EXPERT_LOGPROBS]), 20) and (np.diff(top, axis=1) <= 0).all()
        assert (top[:, 0] >= np.asarray(row[C.EXPERT_LOGPROBS]) - 1e-4).all()
    aligned = pd.read_parquet(run_dir / "uld" / "align")
    paired = 0
    for _, row in aligned.iterrows():
        if row[C.TARGET_TEACHER] is None:
            continue
        teacher = np.stack(row[C.TARGET_TEACHER])
        assert teacher.shape == (len(row[C.TARGET_TOKEN_IDS]), 20) and not np.isnan(teacher[0]).any()
        paired += int((~np.isnan(teacher[:, 0])).sum())
    assert paired > 0
    # the same data, seed and steps as kd: only the ULD term can make the adapters differ
    kd_weights, uld_weights = (load_file(Path(r["adapter"]) / "adapter_model.safetensors") for r in (kd, uld))
    assert any(not torch.equal(kd_weights[name], uld_weights[name]) for name in kd_weights)


@pytest.mark.slow
def test_a_stage_run_again_with_other_settings_says_which(tiny_model_dirs, tmp_path, local_ray, uninterrupted, capfd):
    """An hour-long stage about to run again says why, in the config's own names: the settings that
    changed since it completed (a marker from before settings were kept says it cannot tell)."""
    from titok.layout import share_stages

    share_stages(uninterrupted["run_dir"], tmp_path / "run")  # queries, labels, scores: no engine work here
    transplant(tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "filter.k=0.7"), until="filter")
    capfd.readouterr()
    transplant(tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "filter.k=0.5"), until="filter")
    said = capfd.readouterr().err
    assert "[filter] recomputing it: changed since it completed: filter.k 0.7 -> 0.5 (the old output waits in " in said, said
    assert "[scores] recomputing" not in said  # reused, not run again
    (event,) = [e for e in RunDir(tmp_path / "run").events() if e["event"] == "stage_settings_changed"]
    assert event["stage"] == "filter" and event["change"].endswith("filter.k 0.7 -> 0.5")

    marker = tmp_path / "run" / "filter" / "_COMPLETE.json"
    record = json.loads(marker.read_text())
    del record["settings"]  # as a titok that kept no settings wrote it
    marker.write_text(json.dumps(record))
    transplant(tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "filter.k=0.6"), until="filter")
    assert "[filter] recomputing it: its settings changed (the run that completed it kept no record of which)" in \
        capfd.readouterr().err


def test_a_restarted_stage_keeps_only_what_it_can_resume_from(tmp_path):
    run = RunDir(tmp_path)
    path = run.start("train", "fp1", resumable=("ray",))
    (path / "ray").mkdir()
    (path / "ray" / "checkpoint").write_text("step 2")
    (path / "adapter").mkdir()
    run.start("train", "fp1", resumable=("ray",))  # the same attempt, resubmitted
    assert (path / "ray" / "checkpoint").read_text() == "step 2" and not (path / "adapter").exists()
    run.start("train", "fp2", resumable=("ray",))  # another config: nothing of the old attempt is reused
    assert not (path / "ray").exists()


def test_a_runner_takes_made_rows_only_for_its_next_stages(tiny_model_dirs, tmp_path):
    """A zoo hands rows it made for several runs at once to each run's ``StageRunner``: only for the
    next stages, in order, so rows can never be taken by a stage they were not made for."""
    from titok.workflows.pipeline import SourceEngines, StageRunner

    cfg = tiny_transplant_config(tiny_model_dirs, tmp_path / "run")
    runner = StageRunner(cfg, SourceEngines(cfg, str(tmp_path), {}))
    rows = pa.table({C.SAMPLE_ID: [0]})
    assert runner.next_stage == "queries"
    with pytest.raises(ValueError, match=r"\['filter', 'align'\] are not the next stages .* \(next: \['queries', 'labels'\]"):
        runner.provide(filter=rows, align=rows)
    with pytest.raises(ValueError, match="not the next stages"):
        runner.provide(queries=rows)  # the queries stage makes its own: a provided pool would be ignored
    with pytest.raises(ValueError, match="stage 'labels' is not the next one"):
        runner.run_next("labels")
    assert not runner.has_provided("filter") and runner.timings == {} and runner.rows is None


def test_the_rates_of_an_lr_search_are_kept_per_recipe_whatever_rates_are_searched(tiny_model_dirs, tmp_path):
    """A search that adds or drops rates finds the rates it already trained; another recipe (epochs, the
    rows: another method's kept samples) keeps its own, and a run's folder of an older recipe goes."""
    from titok.workflows.pipeline import SourceEngines, StageRunner

    def kept_rates(*overrides):
        cfg = tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "train.validation_fraction=0.2", *overrides)
        return StageRunner(cfg, SourceEngines(cfg, str(tmp_path), {})).kept_rates()

    searched = kept_rates("train.lr_search=[1e-4, 1e-3]")
    searched.mkdir(parents=True)
    assert kept_rates("train.lr_search=[1e-3, 1e-2]", "train.lr=5e-3") == searched
    assert kept_rates("train.lr_search=[]") is None
    kd = kept_rates("train.lr_search=[1e-3]", "filter.method=kd")
    assert kd.parent == tmp_path / "run" / "kd" / "lr-rates" and searched.is_dir()
    longer = kept_rates("train.lr_search=[1e-3]", "train.epochs=2")
    assert longer.parent == searched.parent and longer != searched and not searched.exists()
