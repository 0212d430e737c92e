"""The grafting diagnosis's per-step scale figures (benchmarks/grafting_scale.py)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "grafting_scale", Path(__file__).resolve().parents[2] / "benchmarks" / "grafting_scale.py")
grafting_scale = importlib.util.module_from_spec(SPEC)
sys.modules["grafting_scale"] = grafting_scale           # its dataclass looks its module up
SPEC.loader.exec_module(grafting_scale)


def test_grafted_step_keeps_every_tensor_at_its_raw_size():
    scale = grafting_scale.step_scale(3, raw=[0.3, 0.4], natural=[0.3, 0.4], sizes=[100, 100], max_norm=1.0)
    assert scale.global_ratio == pytest.approx(1.0) and scale.clip == 1.0
    assert scale.ratio_low == scale.ratio_high == pytest.approx(1.0) and scale.starved == 0.0


def test_one_blown_up_tensor_clips_the_others_below_adams_epsilon():
    # tensor 0 grows 1e6-fold, tensor 1 keeps its size: the global clip shrinks tensor 1 by ~1e-5
    scale = grafting_scale.step_scale(5, raw=[1e-3, 1e-5], natural=[1e3, 1e-5], sizes=[10_000, 10_000], max_norm=1.0)
    assert scale.clip == pytest.approx(1e-3, rel=1e-6)
    assert scale.ratio_high / scale.ratio_low == pytest.approx(1e6)
    assert scale.starved == 0.5                     # 1e-5 * 1e-3 / 100 = 1e-10 per element < 1e-8
    assert math.isclose(scale.global_ratio, 1e3 / math.hypot(1e-3, 1e-5), rel_tol=1e-9)


def test_no_clipping_without_a_bound():
    assert grafting_scale.clip_factor(50.0, None) == 1.0 and grafting_scale.clip_factor(0.5, 1.0) == 1.0


def _short(value: float) -> str:
    """A figure as docs/study.md's grafting table writes it."""
    if 1 <= value < 1e3:
        return f"{value:.0f}"
    if 0.1 <= value < 1:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def test_the_grafting_table_in_the_study_docs_is_the_committed_measurement():
    import json

    root = Path(__file__).resolve().parents[2]
    table = [line for line in (root / "docs/study.md").read_text().splitlines()
             if line.startswith(("| relative", "| absolute"))]
    assert len(table) == 4
    for line in table:
        mode = line.split()[1]
        arm = "grit_paper_grafted" if "| grafted |" in line else "grit_paper"
        got = json.loads((root / f"benchmarks/results/grafting-scale-{mode}-2cpu.json").read_text())[arm]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2:] == [_short(got["global_ratio"]), _short(got["clip"]), _short(got["ratio_spread"]),
                             f"{got['starved']:.0%}", f"{got['final_val_loss']:.3f}"], line
        assert got["setting"].get("damping_mode", "relative") == mode and got["steps_preconditioned"] == 29
