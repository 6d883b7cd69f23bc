"""The package's shape: no import cycles between modules or between packages (imports inside
functions and modules named in strings, as dispatch tables do, included), and no library module
imports the recipes (ual.pipeline) or the command line (ual.cli)."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "ual"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("ual",) + path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _owner(name: str, mods) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
                names = [node.value]
            for name in names:
                target = _owner(name, mods)
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def _package(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])  # ual.data.stage -> ual.data; ual.cli -> ual.cli


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycles(level):
    graph = import_graph()
    if level == "package":
        packages: dict[str, set[str]] = {}
        for mod, targets in graph.items():
            packages.setdefault(_package(mod), set()).update(_package(t) for t in targets if _package(t) != _package(mod))
        graph = packages
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as exc:
        pytest.fail(f"{level} import cycle: {' -> '.join(exc.args[1])}")


def test_the_graph_sees_imports_inside_functions():
    """The check would be empty if it missed lazy imports: the CLI reaches the stages only through them."""
    graph = import_graph()
    assert "ual.pipeline" in graph["ual.cli"]
    assert "ual.training.stage" in graph["ual.pipeline"]  # imported inside run_stage


def test_no_library_module_imports_the_recipes_or_the_cli():
    graph = import_graph()
    offenders = sorted(m for m, targets in graph.items() if {"ual.pipeline", "ual.cli"} & targets
                       and m not in ("ual.cli", "ual.pipeline"))
    assert not offenders, offenders


def test_public_api_resolves_every_name_it_lists():
    import ual

    for name in ual.__all__:
        assert getattr(ual, name) is not None, name
    import pytest as _pytest

    with _pytest.raises(AttributeError):
        ual.not_a_thing  # noqa: B018


def test_tests_mirror_the_package():
    """tests/PACKAGE/ for each sub-package of ual (the top-level modules' tests sit in tests/ itself);
    tests/reliability/ drives the CLI across all of them with bad inputs."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert folders - {"reliability"} == packages
    for package in packages:  # and each folder holds tests
        assert list((tests / package).glob("test_*.py")), package
