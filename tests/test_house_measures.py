"""The house measures of STYLE.md (issue 59), measured so that they cannot silently regress: no
function of the project's packages is over 60 lines (a longer one is two concepts sharing a
name), and GRIT's manager stays policy with one step entry point, under 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "db", "trainers", "export", "evaluation", "profiling", "pipelines", "benchmarks", "scripts")
LONGEST = 60
MANAGER = REPO / "trainers" / "grit" / "manager.py"


def _sources() -> list[Path]:
    # migrations are generated, dated records of the schema: never edited, so not measured
    return [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
            if "migrations" not in path.relative_to(REPO).parts]


def _long_functions() -> dict[str, str]:
    """``file::name`` -> ``file:line (n lines)`` for every function or method over LONGEST lines,
    counted from its ``def`` line to the last line of its body (decorators excluded)."""
    found = {}
    for path in _sources():
        relative = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    found[f"{relative}::{node.name}"] = f"{relative}:{node.lineno} {node.name} ({lines} lines)"
    return found


def test_no_function_is_over_60_lines():
    offenders = sorted(_long_functions().values())
    assert not offenders, (f"{len(offenders)} function(s) over {LONGEST} lines; split each into named steps:\n"
                           + "\n".join(offenders))


def test_the_grit_manager_stays_under_450_lines():
    lines = len(MANAGER.read_text().splitlines())
    assert lines < 450, f"trainers/grit/manager.py:1 has {lines} lines: move work to layer.py, batched.py or capture.py"


def _grit_manager() -> ast.ClassDef:
    return next(node for node in ast.parse(MANAGER.read_text()).body
                if isinstance(node, ast.ClassDef) and node.name == "GritManager")


def _is_property(method: ast.FunctionDef) -> bool:
    return any((isinstance(d, ast.Name) and d.id == "property") or (isinstance(d, ast.Attribute) and d.attr == "setter")
               for d in method.decorator_list)


def test_the_grit_manager_has_one_public_step_entry_point():
    """Everything between backward and ``optimizer.step()`` is ``before_step``; ``after_step``
    follows the optimizer. No other public method of GritManager steps or preconditions
    (``total_steps`` is a property, the run's length, not a step)."""
    methods = [node for node in _grit_manager().body if isinstance(node, ast.FunctionDef)]
    stepping = {m.name: f"trainers/grit/manager.py:{m.lineno} {m.name}" for m in methods
                if not m.name.startswith("_") and not _is_property(m)
                and ("step" in m.name or "precondition" in m.name)}
    assert sorted(stepping) == ["after_step", "before_step"], (
        "GritManager's step is before_step (then after_step); found: " + ", ".join(stepping.values()))


def test_only_the_manager_runs_the_parts_of_its_step():
    """The parts ``before_step`` runs in order are called from no other module of the project, so
    the order (sync, invert, regularise, precondition, clip) is written in one place."""
    before_step = next(node for node in _grit_manager().body
                       if isinstance(node, ast.FunctionDef) and node.name == "before_step")
    parts = {call.func.attr for call in ast.walk(before_step)
             if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
             and isinstance(call.func.value, ast.Name) and call.func.value.id == "self"}
    parts -= {"factors"}    # reads which gradients there are; the batched engine has its own of that name
    assert {"sync_factors", "refresh_inverses", "add_regularizer_gradients"} <= parts, parts
    callers = [f"{path.relative_to(REPO)}:{call.lineno} {call.func.attr}" for path in _sources() if path != MANAGER
               for call in ast.walk(ast.parse(path.read_text()))
               if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in parts]
    assert not callers, "call GritManager.before_step instead of a part of it:\n" + "\n".join(callers)
