"""The shape of ``tasks/``: layers that import only downwards, no import cycle, no oversized module.

Read with the standard library's ``ast``, so nothing is imported: every ``import`` counts,
also those inside functions and under ``TYPE_CHECKING`` (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"

# Lowest first. A module may import from its own package and from lower layers; never upwards,
# never sideways into another package of its own layer.
LAYERS = [
    ["tasks.errors"],
    ["tasks.config"],
    ["tasks.io"],
    ["tasks.registry", "tasks.embedded"],
    ["tasks.evaluation", "tasks.rewards", "tasks.rl"],
    ["tasks.steps"],
    ["tasks.local"],
    ["tasks.cli"],
]
# What dags/ and plugins/ may import: the steps, the config and its errors, and the connections
# that turn Airflow connections into credentials.
ENTRY_POINTS = ["tasks.steps", "tasks.config", "tasks.errors", "tasks.io.connections"]
MAX_LINES = 900
# The embedded default is the demo's world: the pipeline never depends on it.
DEMO_WORLD = "tasks.embedded"
DEMO_WORLD_USERS = ["tasks.embedded", "tasks.local", "tasks.cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(TASKS.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The ``tasks`` modules ``path`` imports (``from tasks.steps import review`` names the module
    ``tasks.steps.review``; ``from tasks.io.s3 import parse_s3_uri`` names ``tasks.io.s3``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "tasks")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; the layout check reads absolute ones only")
            if node.module and node.module.split(".")[0] == "tasks":
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if submodule in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the layer entry ``module`` belongs to)."""
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return index, entry
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS in {__file__}")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    violations = []
    for module, targets in sorted(graph.items()):
        if module == "tasks":
            continue
        level, home = layer_of(module)
        for target in sorted(targets):
            if target == "tasks":
                continue
            target_level, target_home = layer_of(target)
            if target_level > level or (target_level == level and target_home != home):
                violations.append(f"{module} (layer {home}) imports {target} (layer {target_home})")
    return violations


def test_tasks_is_grouped_into_subpackages_with_a_docstring_each():
    packages = [path.parent for path in TASKS.glob("*/__init__.py")]
    assert len(packages) >= 5, packages
    for init in TASKS.glob("*/__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        docstring = ast.get_docstring(tree) or ""
        assert "May import" in docstring, f"{init} must say what it owns and what it may import"


def test_no_import_cycle_among_tasks_modules():
    assert find_cycle(import_graph()) is None


def test_every_import_goes_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_only_the_demo_entry_points_import_the_embedded_world():
    users = sorted(
        module for module, targets in import_graph().items()
        if any(target == DEMO_WORLD or target.startswith(DEMO_WORLD + ".") for target in targets)
        and not any(module == user or module.startswith(user + ".") for user in DEMO_WORLD_USERS)
    )
    assert users == []


def test_dags_and_plugins_use_the_entry_points_only():
    known = set(project_modules())
    reached = []
    for folder in ("dags", "plugins"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for module in imported_modules(path, known):
                if not any(module == entry or module.startswith(entry + ".") for entry in ENTRY_POINTS):
                    reached.append(f"{path.relative_to(ROOT)} imports {module}")
    assert reached == []


def test_no_module_is_too_long_to_read():
    long = {str(path.relative_to(ROOT)): count for path in TASKS.rglob("*.py")
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}, ["a2", "b", "a2"]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert find_cycle(graph) == expected


def test_the_layer_check_names_an_upward_and_a_sideways_import():
    graph = {
        "tasks.io.s3": {"tasks.steps.review", "tasks.config"},
        "tasks.rl.trainer": {"tasks.evaluation.stats", "tasks.rl.policy", "tasks.io.models"},
    }
    assert layer_violations(graph) == [
        "tasks.io.s3 (layer tasks.io) imports tasks.steps.review (layer tasks.steps)",
        "tasks.rl.trainer (layer tasks.rl) imports tasks.evaluation.stats (layer tasks.evaluation)",
    ]
