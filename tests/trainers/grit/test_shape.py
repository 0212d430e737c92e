"""The shape of GRIT's code (issue 59), measured so that it cannot silently regress: the manager
is policy and one step entry point (under 450 lines), no function in ``trainers/grit/`` is over 60
lines, and nothing there reaches into torch's private module dictionaries."""

from __future__ import annotations

import ast
from pathlib import Path

GRIT = Path(__file__).resolve().parents[3] / "trainers" / "grit"


def test_the_manager_stays_under_450_lines():
    lines = len((GRIT / "manager.py").read_text().splitlines())
    assert lines < 450, f"trainers/grit/manager.py has {lines} lines: move work to layer.py, batched.py or capture.py"


def test_no_function_in_grit_is_over_60_lines():
    long = [f"{path.name}::{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(GRIT.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def test_grit_reads_modules_through_torchs_public_api():
    step = sorted(GRIT.glob("*.py"))
    private = [f"{path.name}:{node.lineno} {node.attr}" for path in step
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr in ("_modules", "_parameters", "_buffers")]
    assert not private, private


def test_the_manager_has_one_step_entry_point():
    from trainers.grit import GritManager

    gone = [name for name in ("precondition_step", "_precondition_step", "precondition", "precondition_and_clip")
            if hasattr(GritManager, name)]
    assert not gone and callable(GritManager.before_step), gone
