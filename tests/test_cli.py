"""One vocabulary on the command line: defaults in every help, stage names as choices, one name per
idea (held-out examples, split seed, the config file), older spellings still accepted, a version."""

import re

import pytest

from titok.choices import STAGES
from titok.cli import build_parser, main


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"titok {importlib.metadata.version('titok')}"


def test_subcommand_help_shows_defaults(capsys):
    assert "bf16 dense peak of one GPU (TFLOP/s; H100: 989) (default: 989.0)" in _help(capsys, "plan")
    assert "training examples to use (default: 256)" in _help(capsys, "sft")
    assert "(default: None)" not in _help(capsys, "eval") and "(default: False)" not in _help(capsys, "transplant")
    assert "--verbose" in _help(capsys, "migrate")


def test_until_takes_only_stage_names(capsys):
    parser = build_parser()
    assert parser.parse_args(["transplant", "--until", "filter"]).until == "filter"
    with pytest.raises(SystemExit):
        parser.parse_args(["transplant", "--until", "filtering"])
    err = capsys.readouterr().err
    assert "invalid choice: 'filtering'" in err and all(repr(stage) in err for stage in STAGES)


@pytest.mark.parametrize("argv, field, value", [
    (["eval", "--examples", "7"], "examples", 7),
    (["eval", "--n", "7"], "examples", 7),  # older spelling
    (["eval", "--split-seed", "3"], "split_seed", 3),
    (["eval", "--seed", "3"], "split_seed", 3),
    (["compare", "--num-seeds", "3"], "num_seeds", 3),
    (["compare", "--seeds", "3"], "num_seeds", 3),
    (["migrate", "--config", "zoo.yaml"], "config", "zoo.yaml"),
    (["migrate", "--manifest", "zoo.yaml"], "config", "zoo.yaml"),
])
def test_one_name_per_idea_and_the_old_names_still_work(argv, field, value):
    assert getattr(build_parser().parse_args(argv), field) == value


def test_older_spellings_stay_out_of_the_help(capsys):
    assert not re.search(r"--n\b|--seed\b", _help(capsys, "eval"))
    assert "--seeds" not in _help(capsys, "compare") and "--manifest" not in _help(capsys, "migrate")


def test_held_out_examples_have_one_name_in_every_config():
    from titok.workflows.compare import CompareConfig
    from titok.config import EvalConfig
    from titok.workflows.zoo import GateSettings

    assert "examples" in EvalConfig.model_fields and "examples" in GateSettings.model_fields
    assert "examples" in CompareConfig.model_fields["eval"].annotation.model_fields
