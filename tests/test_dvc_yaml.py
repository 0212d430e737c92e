"""``dvc.yaml`` declares what each stage really runs and reads.

For every stage (``foreach`` expanded), the project modules its command imports, directly or
through other project modules (top-level and in-function imports alike), must each be covered by
one of the stage's ``deps``; otherwise DVC would serve a stale result after that module changed.
And every params section a stage declares must be read by that code; otherwise an unrelated
change would re-run it.
"""

from __future__ import annotations

import ast
import importlib
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipelines.params import Params

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "trainers", "evaluation", "export", "db", "profiling")
SECTIONS = frozenset(Params.model_fields)


def module_file(name: str) -> Path | None:
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _lazy_attribute_imports(tree: ast.Module) -> set[ast.AST]:
    """Imports inside a module-level ``__getattr__``: they run only for the name asked for, which
    the importing module's ``from package import Name`` resolves (below)."""
    return {node for top in tree.body if isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
            for node in ast.walk(top)}


def _defining_module(package: str, name: str) -> str | None:
    """The module that really defines ``package.name`` (a lazily re-exported class, say)."""
    value = getattr(importlib.import_module(package), name, None)
    defined_in = getattr(value, "__module__", None)
    return defined_in if isinstance(defined_in, str) and defined_in.split(".")[0] in PACKAGES else None


@cache
def imported_modules(name: str) -> frozenset[str]:
    path = module_file(name)
    tree = ast.parse(path.read_text())
    lazy = _lazy_attribute_imports(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in lazy:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if module_file(submodule)
                              else _defining_module(node.module, alias.name) or node.module)
    return frozenset(m for m in found if m.split(".")[0] in PACKAGES)


def runs_code(path: Path) -> bool:
    """False for a package ``__init__`` that holds only its docstring: nothing in it can change
    a result, so it need not be a dep."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def closure(module: str) -> dict[str, Path]:
    """Every project module that running ``python -m module`` may execute, with its file
    (docstring-only package ``__init__`` files left out)."""
    seen: dict[str, Path] = {}
    todo = [module, f"{module}.__main__"]        # ``python -m package`` runs its ``__main__.py``
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):   # importing a.b.c runs a/__init__ and a/b/__init__ too
            name = ".".join(parts[:i])
            path = module_file(name)
            if path is not None and name not in seen:
                seen[name] = path
                todo.extend(imported_modules(name))
    return {name: path for name, path in seen.items() if runs_code(path)}


def sections_read(paths) -> set[str]:
    """Params sections the code reads: ``params.<section>``, ``<x>.params.<section>`` and
    ``params.get("<section>")`` (the store's recorded params)."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in SECTIONS:
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id == "params") or (
                        isinstance(owner, ast.Attribute) and owner.attr == "params"):
                    found.add(node.attr)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == "params" and node.args
                  and isinstance(node.args[0], ast.Constant) and node.args[0].value in SECTIONS):
                found.add(node.args[0].value)
    return found


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    variant = next(iter(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["variants"]))
    expanded = {}
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        expanded[name] = yaml.safe_load(yaml.safe_dump(body).replace("${key}", variant))
    return expanded


@pytest.mark.parametrize("name", list(stages()))
def test_every_module_a_stage_runs_is_one_of_its_deps(name):
    stage = stages()[name]
    module = stage["cmd"].split(" -m ", 1)[1].split()[0]
    deps = [Path(str(d)) for d in stage.get("deps", [])]
    uncovered = sorted(str(path.relative_to(REPO_ROOT)) for path in closure(module).values()
                       if not any(path.relative_to(REPO_ROOT).is_relative_to(dep) for dep in deps))
    assert not uncovered, f"{name} runs these files but dvc.yaml does not declare them as deps: {uncovered}"


@pytest.mark.parametrize("name", list(stages()))
def test_every_params_section_a_stage_declares_is_read(name):
    stage = stages()[name]
    module = stage["cmd"].split(" -m ", 1)[1].split()[0]
    declared = {str(p).split(".")[0] for p in stage.get("params", [])}
    unread = declared - sections_read(closure(module).values())
    assert not unread, f"{name} declares params it never reads: {sorted(unread)}"


def test_the_checks_see_a_missing_dep_and_an_unread_section():
    """The closure follows imports into other packages and in-function imports."""
    files = {str(p.relative_to(REPO_ROOT)) for p in closure("pipelines.evaluate").values()}
    assert {"pipelines/stage.py", "db/store.py", "evaluation/stats.py", "export/backend.py"} <= files
    assert "trainers/grit/manager.py" in {str(p.relative_to(REPO_ROOT)) for p in closure("pipelines.probe").values()}
    assert "probe" not in sections_read(closure("pipelines.prepare_model").values())


def test_every_setting_that_needs_cuda_reruns_the_first_stage_which_refuses_it():
    """``prepare_model`` refuses a setting this machine cannot honour before any heavy work; an
    experiment that changes only that setting must re-run it, so its params name every one."""
    from trainers.hardware import CUDA_ONLY

    declared = set(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["prepare_model"]["params"])
    missing = [f"{need.section}.{need.field}" for need in CUDA_ONLY
               if need.section not in declared and f"{need.section}.{need.field}" not in declared]
    assert not missing, f"prepare_model's params in dvc.yaml lack {', '.join(missing)}"


def _stage_files(name: str) -> set[str]:
    module = stages()[name]["cmd"].split(" -m ", 1)[1].split()[0]
    return {str(path.relative_to(REPO_ROOT)) for path in closure(module).values()}


def test_the_params_schema_loads_no_vlm_presets_or_model_code():
    """Every stage validates the whole params first, so whatever the schema imports is every
    stage's dep: it holds the sections' types only, not the preset tables or the VLM models."""
    files = _stage_files("compare") & {str(p.relative_to(REPO_ROOT)) for p in closure("pipelines.params").values()}
    assert not {"trainers/grit_vlm/presets.py", "trainers/grit_vlm/models.py", "trainers/grit_vlm/data.py"} & files


def test_no_text_stage_depends_on_the_vlm_presets():
    """Editing a VLM preset re-runs no stage a VLM run never reaches (its entry point calls
    ``require_text_model``). The study is one but trains through ``trainers.recipe``, whose one
    dispatch imports the VLM variant too, so a training stage is left out here."""
    presets = Path("trainers/grit_vlm/presets.py")
    text = [name for name, stage in stages().items()
            if "require_text_model(" in "".join(module_file(m).read_text() for m in closure_modules(stage))
            and "trainers/recipe.py" not in _stage_files(name)]
    assert {"export", "serve", "evaluate", "compare"} <= set(text)
    depending = [name for name in text if any(presets.is_relative_to(str(dep)) for dep in stages()[name]["deps"])]
    assert not depending, f"these text stages list trainers/grit_vlm/presets.py in their deps: {depending}"


def closure_modules(stage: dict) -> list[str]:
    """The stage's own entry module (and its package's, for a ``python -m package``)."""
    module = stage["cmd"].split(" -m ", 1)[1].split()[0]
    return [m for m in (module, f"{module}.__main__") if module_file(m) is not None]
