"""The import graph runs one way: the ground package, then the owners, then the stage entry
points on top; no module imports a higher floor, no two modules import each other in a circle,
and no stage entry point imports another (what two stages share lives below them). The
benchmarks measure what lies below the stages: none imports a ``pipelines`` module but those that
replay a stage's own work.

``python tests/test_architecture.py`` prints the counts this test checks.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Lower floors first. An owner may import the ground and the owners before it: export turns what
# trainers produce into served files, profiling measures the steps trainers run (for the GPU check
# and the benchmarks), evaluation measures what export serves.
FLOORS = {"core": 0, "db": 1, "trainers": 1, "export": 2, "profiling": 2, "evaluation": 3, "pipelines": 4}
# Packages that may not import their floor-mates (db and trainers, export and profiling stand side by side).
SIDE_BY_SIDE = {("db", "trainers"), ("trainers", "db"), ("export", "profiling"), ("profiling", "export")}
# Benchmarks that replay a stage's own work and so import it: grafting_scale.py trains one study
# trial as the study does (its params and ``pipelines.study.trial.trial_params``).
REPLAYS_A_STAGE = {"benchmarks/grafting_scale.py"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in FLOORS:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    nested = {node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.append((name, node.lineno, node in nested))
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _, _ in imports_of(path, modules) if target != name}
            for name, path in modules.items()}


def upward_imports() -> list[str]:
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        here = name.split(".")[0]
        for target, line, _ in imports_of(path, modules):
            there = target.split(".")[0]
            if FLOORS[there] > FLOORS[here] or (here, there) in SIDE_BY_SIDE:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {target}")
    return bad


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges, index, low, stack, on_stack, found = graph(), {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def stage_cross_imports() -> list[str]:
    stages = {name for name in project_modules() if name.startswith("pipelines.") and
              (REPO_ROOT / "dvc.yaml").read_text().count(f"-m {name}")}
    return sorted(f"{a} imports {b}" for a in stages for b in graph()[a] if b in stages)


def benchmark_stage_imports(folder: Path = REPO_ROOT / "benchmarks") -> dict[str, list[str]]:
    """Benchmark file (relative to the repository) -> the ``pipelines`` modules it imports."""
    modules = project_modules()
    found = {}
    for path in sorted(folder.rglob("*.py")):
        stages = [f"{target} (line {line})" for target, line, _ in imports_of(path, modules)
                  if target.split(".")[0] == "pipelines"]
        if stages:
            found[path.relative_to(folder.parent).as_posix()] = stages
    return found


def defined_names(path: Path) -> set[str]:
    """Names a module binds at its top level, including inside top-level ``if``/``try`` blocks."""
    names, pending = set(), list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
            pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return names


def unresolved_imports() -> list[str]:
    """``from project.module import name`` where the module defines no ``name``: an import inside a
    function fails only when that function runs, so a moved helper breaks a stage at run time."""
    modules = project_modules()
    bad = []
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules):
                continue
            target = modules[node.module]
            defined = defined_names(target)
            for alias in node.names:
                if alias.name != "*" and alias.name not in defined and f"{node.module}.{alias.name}" not in modules:
                    bad.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {alias.name} "
                               f"from {node.module}, which does not define it")
    return bad


def test_every_project_import_names_something_defined():
    assert not unresolved_imports()


def test_no_module_imports_a_higher_floor():
    assert not upward_imports()


def test_no_import_circle():
    assert not cycles()


def test_no_stage_imports_another_stage():
    assert not stage_cross_imports()


def test_no_benchmark_imports_a_stage_module_but_those_that_replay_a_stage():
    """What a benchmark measures with (``profiling/``) lives below the stages; the exceptions
    still need their stage, or they leave the list."""
    found = benchmark_stage_imports()
    assert {name: imports for name, imports in found.items() if name not in REPLAYS_A_STAGE} == {}
    assert set(found) >= REPLAYS_A_STAGE


def test_the_checks_would_see_a_violation(tmp_path, monkeypatch):
    """A ground module importing a stage is reported (the checks are not vacuous)."""
    fake = tmp_path / "core"
    fake.mkdir()
    (fake / "leak.py").write_text("from pipelines.stage import run_stage\n")
    modules = {**project_modules(), "core.leak": fake / "leak.py"}
    assert [t for t, _, _ in imports_of(fake / "leak.py", modules)] == ["pipelines.stage"]
    assert FLOORS["pipelines"] > FLOORS["core"]
    assert "no_such_helper" not in defined_names(REPO_ROOT / "core" / "jsonl.py")
    assert "read_jsonl" in defined_names(REPO_ROOT / "core" / "jsonl.py")
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "timing.py").write_text("def main():\n    from pipelines.gpu_check.items import main\n")
    assert benchmark_stage_imports(bench) == {"benchmarks/timing.py": ["pipelines.gpu_check.items (line 2)"]}


if __name__ == "__main__":
    modules = project_modules()
    inside = Counter(name.split(".")[0] for name, path in modules.items()
                     for _, _, nested in imports_of(path, modules) if nested)
    print(f"modules: {len(modules)}; upward imports: {len(upward_imports())}; circles: {len(cycles())}; "
          f"stage-to-stage imports: {len(stage_cross_imports())}; project imports inside functions: "
          f"{sum(inside.values())} ({dict(sorted(inside.items()))})")
    for line in (upward_imports() + [' <-> '.join(c) for c in cycles()] + stage_cross_imports()
                 + unresolved_imports()):
        print("  ", line)


def test_stage_entry_points_keep_orchestration_only():
    """A stage's ``main()`` wires module-level functions to the stage runner: no function defined
    inside it, so each unit of a stage can be read and tested alone."""
    nested = []
    for path in sorted((REPO_ROOT / "pipelines").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                nested += [f"{path.name}: main() defines {inner.name}" for inner in ast.walk(node)
                           if inner is not node and isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef)]
    assert not nested, nested
