"""``titok`` command line: ``transplant``, ``sft``, ``eval``, ``compare``, ``demo-excess``."""

from __future__ import annotations

import argparse
import json
import sys

from titok.config import ConfigError, describe_fields


def _transplant(args: argparse.Namespace) -> None:
    from titok.config import load_config
    from titok.pipeline import format_summary, transplant

    if args.help_config:
        print("\n".join(describe_fields()))
        return
    if not args.config and not args.set:
        raise ConfigError("give --config FILE.yaml (and/or --set key=value for every required field)")
    cfg = load_config(args.config, args.set)
    result = transplant(cfg, until=args.until)
    print(format_summary(result))


def _sft(args: argparse.Namespace) -> None:
    from titok.config import TrainConfig, apply_overrides
    from titok.sft import SFT_DEFAULTS, train_source_adapter

    try:
        train = TrainConfig.model_validate(apply_overrides({**SFT_DEFAULTS}, args.set))
    except Exception as err:
        raise ConfigError(f"invalid sft training config: {err}") from None
    path = train_source_adapter(args.base, args.task, args.out, train, args.seed, args.n_train)
    print(f"source adapter: {path}")


def _eval(args: argparse.Namespace) -> None:
    from titok.evaluate import evaluate, write_report

    report = evaluate(args.base, args.adapter, args.task, args.seed, args.n, args.dtype, args.max_new_tokens)
    summary = {k: v for k, v in report.items() if k != "examples"}
    print(json.dumps(summary, indent=2))
    if args.out:
        write_report(report, args.out)
        print(f"report: {args.out}")


def _compare(args: argparse.Namespace) -> None:
    from titok.compare import CompareConfig, load_compare_config, run_compare

    if args.help_config:
        print("\n".join(describe_fields(CompareConfig)))
        return
    if not args.config:
        raise ConfigError("give --config FILE.yaml (see configs/compare.yaml)")
    report = run_compare(load_compare_config(args.config, args.set, args.seeds))
    print((report / "results.md").read_text())
    print(f"report: {report}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="titok", description="Transplant LoRA adapters between LLM backbones (TiTok).")
    commands = parser.add_subparsers(dest="command", required=True)

    tp = commands.add_parser("transplant", help="move a source LoRA onto a target base model",
                             description="Run or resume a transplant: queries -> labels -> scores -> filter -> align -> "
                                         "train -> export. Stages already complete in run_dir are reused.")
    tp.add_argument("--config", help="transplant YAML (see configs/demo.yaml)")
    tp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, dotted (filter.top_m=64, train.deepspeed_stage=3); repeatable")
    tp.add_argument("--until", help="stop after this stage (queries, labels, scores, filter, align, train, export)")
    tp.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    tp.set_defaults(run=_transplant)

    sft = commands.add_parser("sft", help="train a source LoRA on a task's training examples")
    sft.add_argument("--base", default="smollm2-135m", help="base model (short name, .gguf, HF folder or hub id)")
    sft.add_argument("--task", default="boolean_expressions", help="built-in task or BBH-format JSON file")
    sft.add_argument("--out", required=True, help="folder for the PEFT adapter")
    sft.add_argument("--seed", type=int, default=0, help="seed for the task split and training")
    sft.add_argument("--n-train", type=int, default=256, help="training examples to use")
    sft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a training field (epochs=1, lr=5e-4, workers=2, deepspeed_stage=3, lora.rank=16)")
    sft.set_defaults(run=_sft)

    ev = commands.add_parser("eval", help="score a base model (+ adapter) on a task's held-out examples")
    ev.add_argument("--base", required=True, help="base model (short name, .gguf, HF folder or hub id)")
    ev.add_argument("--adapter", help="PEFT adapter folder (omit for the vanilla base)")
    ev.add_argument("--task", default="boolean_expressions", help="built-in task or task file")
    ev.add_argument("--seed", type=int, default=0, help="seed of the task split")
    ev.add_argument("--n", type=int, default=100, help="held-out examples to score")
    ev.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="inference dtype")
    ev.add_argument("--max-new-tokens", type=int,
                    help="greedy answer budget (default: 1.25 x the longest reference response + 8 tokens)")
    ev.add_argument("--out", help="write the full report (with example predictions) as JSON here")
    ev.set_defaults(run=_eval)

    cmp = commands.add_parser("compare", help="TiTok vs. vanilla, KD and ablations over tasks x targets x seeds, with a report",
                              description="Transplant with every method, evaluate every adapter and the vanilla targets, "
                                          "write a report folder (Markdown, CSV, charts, token HTML). Resumable.")
    cmp.add_argument("--config", help="compare YAML (see configs/compare.yaml)")
    cmp.add_argument("--seeds", type=int, help="transplant seeds per task (overrides the config)")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a compare field (eval.examples=20, transplant.filter.top_m=16); repeatable")
    cmp.add_argument("--help-config", action="store_true", help="list every compare field")
    cmp.set_defaults(run=_compare)

    demo = commands.add_parser("demo-excess", help="train a tiny pirate LoRA on SmolLM2 and show the tokens it makes likelier")
    demo.add_argument("--out", default="runs/demo-excess", help="where the demo adapter is kept (reused on rerun)")
    demo.add_argument("--steps", type=int, default=40, help="LoRA training steps")
    demo.set_defaults(run=lambda a: __import__("titok.demo", fromlist=["run_excess_demo"]).run_excess_demo(a.out, steps=a.steps))

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ConfigError as err:
        print(f"titok: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
