"""``titok`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="titok", description="Transplant LoRA adapters between LLM backbones.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo-excess", help="train a tiny pirate LoRA on SmolLM2 and show which response tokens it makes likelier"
    )
    demo.add_argument("--out", default="runs/demo-excess", help="where the demo adapter is kept (reused on rerun)")
    demo.add_argument("--steps", type=int, default=40, help="LoRA training steps")
    args = parser.parse_args(argv)
    if args.command == "demo-excess":
        from titok.demo import run_excess_demo

        run_excess_demo(args.out, steps=args.steps)


if __name__ == "__main__":
    main()
