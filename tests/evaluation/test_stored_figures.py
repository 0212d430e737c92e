"""Every figure the pipeline stores is registered (``evaluation.metrics``): the quality metrics,
the served speed, the training figures and the export parity, each with its unit, direction and
description; the store's ``evaluation_results`` view and every writer use registered names only."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

from evaluation.metrics import (
    PARITY_FIELDS,
    PARITY_FIGURES,
    REGISTRY,
    SIDE_BY_SIDE,
    SPEED_FIGURES,
    STORED_FIGURES,
    TRAINING_FIGURES,
    registered,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def test_every_stored_figure_has_a_unit_a_direction_and_a_description():
    for figure in [*REGISTRY.values(), *STORED_FIGURES.values()]:
        assert figure.unit and figure.label and isinstance(figure.higher_is_better, bool), figure.name
    assert not set(REGISTRY) & set(STORED_FIGURES)


def test_the_evaluation_results_view_reads_registered_figures_only():
    path = REPO_ROOT / "db/migrations/versions/0007_evaluation_results_view.py"
    spec = importlib.util.spec_from_file_location("view_0007", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = re.findall(r"metric = '(\w+)'", module.EVALUATION_RESULTS)
    assert names and all(registered(name) for name in names), names
    assert re.findall(r"backend = '([^']+)'", module.EVALUATION_RESULTS) == [SIDE_BY_SIDE]


def test_the_served_speed_writer_writes_registered_figures():
    from evaluation.speed import speed_figures

    rates = {name: {"decode": [10.0, 12.0], "prefill": [100.0, 90.0]} for name in ("base", "v", "twin")}
    written = speed_figures(rates, ["base", "v"], "twin")
    names = {metric for figures in written.values() for metric in figures}
    assert names == {f.name for f in SPEED_FIGURES}


def _string_keys(path: Path) -> set[str]:
    """Every string a dict literal or a tuple of ``path`` names (the keys its summaries write)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, ast.Tuple) else []
        found |= {k.value for k in items if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return found


def test_the_training_figures_are_what_training_summarises_and_evaluate_stores(tmp_path: Path):
    import json

    from pipelines.evaluate import training_speed

    names = {f.name for f in TRAINING_FIGURES}
    assert names <= _string_keys(REPO_ROOT / "trainers/recipe.py")
    assert names <= _string_keys(REPO_ROOT / "pipelines/train.py")
    (tmp_path / "metrics/train").mkdir(parents=True)
    summary = {name: 1.0 for name in names} | {"final_loss": 0.5}
    (tmp_path / "metrics/train/v.json").write_text(json.dumps(summary))
    assert set(training_speed(tmp_path, "v", 0)) == names
    assert all(f.backend == "train" and f.table == "speed_metrics" for f in TRAINING_FIGURES)


def test_the_export_parity_figures_are_the_parity_check_s_fields():
    from export.parity import Parity

    assert set(PARITY_FIELDS) <= {f.name for f in dataclasses.fields(Parity)}
    assert set(PARITY_FIELDS) <= _string_keys(REPO_ROOT / "pipelines/export.py")     # what export@ stores
    assert {f.name for f in PARITY_FIGURES} == {f"export_parity_{form}_{field}" for form in ("adapter", "merged")
                                                for field in PARITY_FIELDS}


def test_the_study_s_stored_figures_are_registered():
    from db.models import StudyTrial

    floats = [c.name for c in StudyTrial.__table__.columns if c.type.python_type is float]
    assert floats and all(registered(name) for name in floats), floats


def test_compare_all_s_speed_table_is_the_registry_s():
    from evaluation.compare_all import SPEED

    assert [name for name, _ in SPEED] == [f.name for f in [*SPEED_FIGURES, *TRAINING_FIGURES]]
