"""The package's module graph: every module imports, no two modules import each other, and no module
imports a floor above its own (``FLOORS``).

Cycles are found from the source (every ``import``/``from`` statement, those under ``if TYPE_CHECKING:``
too: a cycle of type hints is still two modules that need each other), so the test does not depend on
which module happens to load first.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import titok

PACKAGE = Path(titok.__file__).parent


def _modules() -> dict[str, Path]:
    found = {"titok": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="titok."):
        path = PACKAGE.joinpath(*info.name.split(".")[1:])
        found[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The titok modules ``name`` imports anywhere: inside functions too (a lazy import that closes a
    cycle still ties the two modules together) and under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    stack = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        stack.extend(ast.iter_child_nodes(node))
    return {t for t in targets if t in known and t not in (name, "titok")}


def test_every_module_imports():
    for name in sorted(_modules()):
        importlib.import_module(name)


def test_imports_form_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert graph["titok.workflows.report"] and "titok.workflows.compare" not in graph["titok.workflows.report"]


# The house's floors, bottom up: a module imports its own floor and those below, never one above.
FLOORS = (
    ("names", ("titok.choices", "titok.columns")),  # what a config may choose, column names: no titok import
    ("pure cores and task data", ("titok.core", "titok.tasks")),  # arrays/text in and out, no Ray
    ("infrastructure and Ray shells", ("titok",)),  # configs, run folders, models, engines, stages, training
    ("workflows", ("titok.workflows",)),  # what a command does
    ("the command line", ("titok.cli",)),
)


def floor_of(module: str) -> int:
    """The floor of the longest prefix that names ``module`` (``titok`` itself: everything not named)."""
    matches = [(len(prefix), floor) for floor, (_, prefixes) in enumerate(FLOORS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def test_no_module_imports_a_floor_above_its_own():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name == "titok":
            continue
        for target in sorted(_imports(name, path, set(modules))):
            if floor_of(target) > floor_of(name):
                upward.append(f"{name} ({FLOORS[floor_of(name)][0]}) imports {target} ({FLOORS[floor_of(target)][0]})")
    assert upward == [], "\n".join(upward)
    assert floor_of("titok.core.excess") == 1 and floor_of("titok.workflows.zoo") == 3 and floor_of("titok.cli") == 4
    assert floor_of("titok.stages.fleet") == 2 and floor_of("titok.choices") == 0 and floor_of("titok.tasks.files") == 1


def test_help_and_config_checks_import_no_torch():
    """``titok --help``, every subcommand's ``--help`` and ``--help-config``, a command without its
    config, and a config's validation stay under a second:
    none of them may import torch, transformers or ray (seconds of CPU each)."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom titok.cli import main\n"
        "for argv in ([], ['transplant'], ['plan'], ['sft'], ['eval'], ['compare'], ['migrate'], ['demo-excess']):\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
        "for argv in (['compare'], ['migrate'], ['transplant'], ['compare', '--help-config'], ['eval', '--help-config']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "from titok.config import load_config\n"
        "load_config(None, ['source_base=a', 'source_adapter=b', 'target_base=c', 'task=boolean_expressions', 'run_dir=r'])\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "heavy: []"


def test_each_filter_method_and_engine_is_named_in_its_table_alone():
    """A new method or engine is an entry in ``titok.choices`` (plus its code), never a branch on its name
    elsewhere: no other module holds a string that is a method's or an engine's name. An engine's own
    implementation may name itself; "titok" is also the tool's name (CLI, manifests), so the paper's
    method is checked as ``PAPER_METHOD``'s uses instead."""
    from titok.choices import ENGINES, FILTER_METHODS, PAPER_METHOD

    names = {name: {"titok.choices"} for name in FILTER_METHODS if name != PAPER_METHOD}
    for name, spec in ENGINES.items():
        names[name] = {"titok.choices", spec.implementation.partition(":")[0]}
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and module not in names[node.value]:
                found.append(f"{module}:{node.lineno} {node.value!r}")
    assert found == [], found


def test_run_folder_names_are_spelled_in_runstate_alone():
    """Every file name titok writes into a run or adapter folder is a constant of ``titok.runstate``;
    any other module that spells one (instead of importing it) would drift from it unseen."""
    from titok import runstate

    names = {getattr(runstate, n) for n in runstate.__all__ if n.isupper() and isinstance(getattr(runstate, n), str)}
    found = [f"{module}:{node.lineno} {node.value!r}" for module, path in _modules().items() if module != "titok.runstate"
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    assert found == [], found
