"""``titok`` command line: ``transplant``, ``plan``, ``migrate``, ``sft``, ``eval``, ``compare``, ``demo-excess``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from titok.config import ConfigError, describe_fields


def _transplant(args: argparse.Namespace) -> None:
    from titok.config import load_config

    if args.help_config:
        print("\n".join(describe_fields()))
        return
    if not args.config and not args.set:
        raise ConfigError("give --config FILE.yaml (and/or --set key=value for every required field)")
    cfg = load_config(args.config, args.set)
    if args.dry_run:
        _dry_run(cfg)
        return
    from titok.workflows.pipeline import format_summary, transplant

    result = transplant(cfg, until=args.until)
    print(format_summary(result))


def _dry_run(cfg) -> None:
    """Everything ``transplant`` checks before compute, and the plan; no weights are read."""
    import os

    from titok.validate import validate_inputs
    from titok.workflows.pipeline import check_plan
    from titok.workflows.plan import cluster_resources, local_resources

    validate_inputs(cfg)
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`, or pointed at a cluster: plan for it
        from titok.progress import init_ray

        init_ray()
        resources = cluster_resources()
    else:
        resources = local_resources()
    print(check_plan(cfg, resources).table())
    print("dry run: the config is valid and its plan fits; nothing was computed")


def _plan(args: argparse.Namespace) -> None:
    from titok.config import load_config
    from titok.workflows.plan import Assumptions, Resources, local_resources, make_plan

    cfg = load_config(args.config, args.set)
    local = local_resources()
    cluster_given = any(v is not None for v in (args.nodes, args.gpus_per_node, args.gpu_memory_gib))
    resources = Resources(
        nodes=args.nodes or 1, gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None else local.gpus_per_node,
        gpu_memory_gib=args.gpu_memory_gib or (None if cluster_given else local.gpu_memory_gib),
        host_memory_gib=args.host_memory_gib or (None if cluster_given else local.host_memory_gib),
        gpu_tflops=args.gpu_tflops, source="command line" if cluster_given else local.source)
    plan = make_plan(cfg, resources, Assumptions(mfu_train=args.mfu_train, mfu_inference=args.mfu_inference,
                                                 load_gbps=args.load_gbps, intra_node_gbps=args.intra_node_gbps,
                                                 inter_node_gbps=args.inter_node_gbps))
    print(plan.table())
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2))
    if not plan.fits:
        raise SystemExit(1)


def _sft(args: argparse.Namespace) -> None:
    from titok.workflows.sft import sft_train_config, train_source_adapter
    from titok.validate import check_sft

    from titok.config import resolved_path

    args.out = resolved_path(args.out)  # what is checked is what is written: `..` and symlinks applied once
    length = [f"max_length={args.max_length}"] if args.max_length is not None else []
    train = sft_train_config(overrides=[*args.set, *length])
    check_sft(args.base, args.task, args.out, args.seed, train.max_length, train.lora.target_modules)
    path = train_source_adapter(args.base, args.task, args.out, train, args.seed, args.n_train)
    print(f"source adapter: {path}")


def _eval(args: argparse.Namespace) -> None:
    from titok.config import EvalConfig, read_yaml, validated

    if args.help_config:
        print("\n".join(describe_fields(EvalConfig)))
        return
    flags = {field: getattr(args, field) for field in ("base", "adapter", "task", "split_seed", "examples", "dtype",
                                                       "max_new_tokens", "out", "harness_include", "engine")
             if getattr(args, field) is not None}
    if args.harness:
        flags["harness"] = [task.strip() for task in args.harness.split(",") if task.strip()]
    cfg = validated(EvalConfig, read_yaml(args.config, args.set, **flags), "eval")
    from titok.workflows.evaluate import eval_engine, evaluate, write_report
    from titok.validate import check_eval

    check_eval(cfg)
    if cfg.harness:
        from titok.workflows.harness import check_harness_tasks

        check_harness_tasks(cfg.harness, cfg.harness_include)
    report = evaluate(cfg.base, cfg.adapter, cfg.task, cfg.split_seed, cfg.examples, cfg.dtype, cfg.max_new_tokens,
                      cfg.batch_size, cpus_per_actor=cfg.cpus_per_actor, gpus_per_actor=cfg.gpus_per_actor,
                      engine=eval_engine(cfg))
    summary = {k: v for k, v in report.items() if k != "examples"}
    print(json.dumps(summary, indent=2))
    if cfg.out:
        write_report(report, cfg.out)
        print(f"report: {cfg.out}")
    if cfg.harness:
        from lm_eval.utils import make_table

        from titok.workflows.harness import run_harness, write_harness_results

        results = run_harness(cfg, seed=cfg.split_seed)
        print(make_table(results))
        if cfg.out:
            print(f"lm-eval results: {write_harness_results(results, Path(cfg.out).with_suffix('.lm-eval.json'))}")


def _compare(args: argparse.Namespace) -> None:
    from titok.workflows.compare import run_compare
    from titok.config import CompareConfig, load_compare_config

    if args.help_config:
        print("\n".join(describe_fields(CompareConfig)))
        return
    if not args.config:
        raise ConfigError("give --config FILE.yaml (see configs/compare.yaml)")
    report = run_compare(load_compare_config(args.config, args.set, args.num_seeds))
    print((report / "results.md").read_text())
    print(f"report: {report}")


def _migrate(args: argparse.Namespace) -> None:
    from titok.workflows.zoo import ZooManifest, load_manifest, migrate

    if args.help_config:
        print("\n".join(describe_fields(ZooManifest)))
        return
    if not args.config:
        raise ConfigError("give --config ZOO.yaml (see configs/zoo-demo.yaml)")
    record = migrate(load_manifest(args.config, args.set))
    out = record["manifest"]["out_dir"]
    print(open(f"{out}/summary.md").read())
    print(f"zoo: {out}  (adapters/, zoo.json, summary.md, summary.csv, serve.yaml, serve.sh)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _alias(parser: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """An older spelling of an option, kept working and left out of the help."""
    parser.add_argument(flag, dest=dest, help=argparse.SUPPRESS, **kwargs)


def _positive(kind: type, at_most: float | None = None):
    """An argparse type: a number of ``kind`` above zero (and at most ``at_most``), else argparse's one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0 or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"{text} must be above 0" + (f" and at most {at_most:g}" if at_most else ""))
        return value
    return parse


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("titok")


def _stop(signum: int) -> None:
    """After SIGINT/SIGTERM: leave Ray (a local Ray titok started goes with it), say how to resume, and
    exit at once (128 + the signal), not waiting for threads still blocked on the Ray that is gone."""
    import atexit
    import os
    import signal

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    from titok import supervise

    print(f"titok: stopped by {signal.Signals(signum).name}; {supervise.RESUMES}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    atexit._run_exitfuncs()  # the run-dir lock's holder file and the like
    supervise.python_finished()
    os._exit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    """Every command and option; importing it loads no torch (``--help`` in well under a second)."""
    from titok.choices import ENGINES, STAGES

    parser = argparse.ArgumentParser(prog="titok", description="Transplant LoRA adapters between LLM backbones (TiTok).")
    parser.add_argument("--version", action="version", version=f"titok {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show everything Ray and the libraries print (worker output, Ray Data's per-dataset lines); "
                             "same as TITOK_VERBOSE=1")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], formatter_class=_HelpFormatter, **kwargs)

    tp = command("transplant", help="move a source LoRA onto a target base model",
                 description="Run or resume a transplant: queries -> labels -> scores -> filter -> align -> "
                             "train -> export. Stages already complete in run_dir are reused.")
    tp.add_argument("--config", help="transplant YAML (see configs/demo.yaml)")
    tp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, dotted (filter.top_m=64, train.deepspeed_stage=3); repeatable")
    tp.add_argument("--until", choices=STAGES, help="stop after this stage")
    tp.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    tp.add_argument("--dry-run", action="store_true",
                    help="validate everything and print the plan for this machine (or the cluster in RAY_ADDRESS); "
                         "no model weights are read")
    tp.set_defaults(uses_ray=True, run=_transplant)

    pl = command("plan", help="memory per GPU and host, time and GPU-hours of a transplant, from configs alone",
                 description="Build every model on the meta device from its config.json and print, per stage, "
                             "memory per GPU and per node, FLOPs, time and GPU-hours; say what does not fit and "
                             "what would. Without cluster flags it plans for this machine.")
    pl.add_argument("--config", required=True, help="transplant YAML")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pl.add_argument("--nodes", type=_positive(int), help="nodes in the cluster (default: 1)")
    pl.add_argument("--gpus-per-node", type=_positive(int), help="GPUs per node (default: this machine's)")
    pl.add_argument("--gpu-memory-gib", type=_positive(float), help="memory of one GPU in GiB (default: this machine's)")
    pl.add_argument("--host-memory-gib", type=_positive(float), help="host RAM per node in GiB (default: this machine's)")
    pl.add_argument("--gpu-tflops", type=_positive(float), default=989.0, help="bf16 dense peak of one GPU (TFLOP/s; H100: 989)")
    pl.add_argument("--mfu-train", type=_positive(float, at_most=1.0), default=0.30, help="model-FLOPs utilisation assumed for training")
    pl.add_argument("--mfu-inference", type=_positive(float, at_most=1.0), default=0.15, help="model-FLOPs utilisation assumed for generation/scoring")
    pl.add_argument("--load-gbps", type=_positive(float), default=2.0, help="weight-loading bandwidth per node (GB/s)")
    pl.add_argument("--intra-node-gbps", type=_positive(float), default=300.0,
                    help="all-gather bandwidth per GPU within a node, GB/s (NVLink; H100 SXM ~360 achieved)")
    pl.add_argument("--inter-node-gbps", type=_positive(float), default=25.0,
                    help="all-gather bandwidth per GPU across nodes, GB/s (200 Gb/s per GPU = 25; 400 Gb/s IB ~45)")
    pl.add_argument("--json", help="also write the plan as JSON here")
    pl.set_defaults(run=_plan)

    sft = command("sft", help="train a source LoRA on a task's training examples")
    sft.add_argument("--base", default="smollm2-135m", help="base model (short name, .gguf, HF folder or hub id)")
    sft.add_argument("--task", default="boolean_expressions", help="built-in task or BBH-format JSON file")
    sft.add_argument("--out", required=True, help="folder for the PEFT adapter")
    sft.add_argument("--seed", type=int, default=0, help="seed of the task's train/test split and of training")
    sft.add_argument("--n-train", type=int, default=256, help="training examples to use")
    sft.add_argument("--max-length", type=int, default=None,
                     help="max prompt+response tokens of a training example (same as --set max_length=N; default 512)")
    sft.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a training field (epochs=1, lr=5e-4, workers=2, deepspeed_stage=3, lora.rank=16)")
    sft.set_defaults(uses_ray=True, run=_sft)

    ev = command("eval", help="score a base model (+ adapter) on a task's held-out examples",
                 description="Flags override the config file, --set overrides both; every field: --help-config.")
    ev.add_argument("--config", help="eval YAML (the fields of --help-config)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field; repeatable")
    ev.add_argument("--help-config", action="store_true", help="list every eval field with its default")
    ev.add_argument("--base", help="base model (short name, .gguf, HF folder or hub id); required here or in --config")
    ev.add_argument("--adapter", help="PEFT adapter folder (omit for the vanilla base)")
    ev.add_argument("--task", help="built-in task or task file (default: boolean_expressions)")
    ev.add_argument("--split-seed", type=int, help="seed of the task's train/test split (default: 0)")
    _alias(ev, "--seed", "split_seed", type=int)
    ev.add_argument("--examples", type=int, help="held-out examples to score (default: 100)")
    _alias(ev, "--n", "examples", type=int)
    ev.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="inference dtype (default: auto, bf16 where the device runs it fast, else fp32)")
    ev.add_argument("--max-new-tokens", type=int,
                    help="greedy answer budget (default: 1.25 x the longest reference response + 8 tokens)")
    ev.add_argument("--engine", choices=list(ENGINES),
                    help="engine that answers (default: transformers; vllm: the adapter as a LoRA request, on a GPU)")
    ev.add_argument("--out", help="write the full report (with example predictions) as JSON here")
    ev.add_argument("--harness", metavar="TASKS",
                    help="also run these lm-evaluation-harness tasks (comma-separated, e.g. bbh_zeroshot_web_of_lies) "
                         "through lm-eval's HF backend with the adapter and its chat template; <out>.lm-eval.json")
    ev.add_argument("--harness-include", help="a folder of your own lm-eval task YAML files")
    ev.set_defaults(uses_ray=True, run=_eval)

    cmp = command("compare", help="TiTok vs. vanilla, KD and ablations over tasks x targets x seeds, with a report",
                  description="Transplant with every method, evaluate every adapter and the vanilla targets, "
                              "write a report folder (Markdown, CSV, charts, token HTML). Resumable.")
    cmp.add_argument("--config", help="compare YAML (see configs/compare.yaml)")
    cmp.add_argument("--num-seeds", type=int, help="transplant seeds per task (overrides the config's seeds)")
    _alias(cmp, "--seeds", "num_seeds", type=int)
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a compare field (eval.examples=20, transplant.filter.top_m=16); repeatable")
    cmp.add_argument("--help-config", action="store_true", help="list every compare field")
    cmp.set_defaults(uses_ray=True, run=_compare)

    mg = command("migrate", help="move a whole adapter zoo onto a new base in one job",
                 description="Transplant every adapter of a manifest with shared engines (the source model "
                             "loads once per actor), isolated failures, resume, a release gate per adapter, "
                             "and a zoo folder with provenance, summaries and a vLLM serving config.")
    mg.add_argument("--config", help="zoo manifest YAML (see configs/zoo-demo.yaml)")
    _alias(mg, "--manifest", "config")
    mg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a manifest field (out_dir=..., gate.examples=20, defaults.train.epochs=4)")
    mg.add_argument("--help-config", action="store_true", help="list every manifest field")
    mg.set_defaults(uses_ray=True, run=_migrate)

    demo = command("demo-excess", help="train a tiny pirate LoRA on SmolLM2 and show the tokens it makes likelier")
    demo.add_argument("--out", default="runs/demo-excess", help="where the demo adapter is kept (reused on rerun)")
    demo.add_argument("--steps", type=int, default=40, help="LoRA training steps")
    demo.set_defaults(run=lambda a: __import__("titok.workflows.demo", fromlist=["run_excess_demo"]).run_excess_demo(a.out, steps=a.steps))

    return parser


def main(argv: list[str] | None = None) -> None:
    """The command in this process (tests, notebooks, the child of ``run``)."""
    from titok import signals, supervise

    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            import os

            os.environ["TITOK_VERBOSE"] = "1"
        from titok.progress import RayStartFailed
        from titok.runstate import RunInUse

        signals.install()
        try:
            args.run(args)
        except KeyboardInterrupt:  # ours (titok.signals) or the one Ray raises for it
            _stop(signals.received())
        except (ConfigError, RunInUse) as err:
            print(f"titok: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except RayStartFailed as err:
            print(f"titok: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception as err:  # noqa: BLE001 - only Ray's own failures become a line, the rest a traceback
            if not _ray_lost_part_of_the_run(err):
                raise
            print(f"titok: Ray lost part of the run ({type(err).__name__}: {str(err).strip().splitlines()[0]}); "
                  f"{supervise.RESUMES}", file=sys.stderr)
            raise SystemExit(1) from None
    finally:
        supervise.python_finished()


def _ray_lost_part_of_the_run(err: BaseException) -> bool:
    """A process, node or object of the cluster is gone (killed, out of memory, a node marked dead): not
    a fault of the run's own code, and a rerun resumes; an error raised by titok's code inside a Ray
    task still shows its traceback."""
    fleet = sys.modules.get("titok.stages.fleet")
    if fleet is not None and isinstance(err, fleet.EngineLost):  # out of restarts: the engine's last error is in it
        return True
    if "ray" not in sys.modules:
        return False
    from ray import exceptions as rx

    return isinstance(err, (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError,
                            rx.OutOfMemoryError, rx.RaySystemError, rx.LocalRayletDiedError, rx.ObjectStoreFullError,
                            rx.OutOfDiskError))


def run(argv: list[str] | None = None) -> None:
    """The ``titok`` command (and the ``ray_jobs/`` entry points): a command that runs on Ray goes to a
    watched child process (``titok.supervise``: a driver Ray ends from C++ still gets its one line);
    help, usage errors and the rest stay here."""
    from titok import supervise

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "uses_ray", False) and not supervise.is_child():
        raise SystemExit(supervise.run_child(argv))
    main(argv)

if __name__ == "__main__":
    run()
