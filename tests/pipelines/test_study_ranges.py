"""The report names every tuned value of a chosen setting still at an edge, and why it stayed."""

from __future__ import annotations

from evaluation.tuning import widen
from pipelines.params import Params
from pipelines.study.plan import method_space, remaining_edges


def test_an_edge_at_a_hard_limit_and_one_after_the_last_extension_are_named_apart():
    params = Params()
    space = method_space(params, "pure_grit")                       # learning rate and damping
    best = {"learning_rate": 9.5e-3, "damping": 0.09}
    wider, widened = widen(space, best, params.study.edge_margin, params.study.edge_factor)
    assert [d.name for d, _ in widened] == ["learning_rate", "damping"]
    chosen = {"learning_rate": 0.095, "damping": 0.9}                # at the top of the widened ranges
    notes = remaining_edges(params, "pure_grit", 96, wider, chosen)
    assert len(notes) == 2 and all("widened" not in n for n in notes)   # the report counts widenings by that word
    rate, damping = notes
    assert "learning_rate 0.095 lies at the high edge of [0.0001, 0.1]" in rate and "its hard limit (0.1" in rate
    assert "damping 0.9 lies at the high edge of [0.0001, 1]" in damping and "its hard limit (1" in damping
    inner = remaining_edges(params, "pure_grit", 96, space, {"learning_rate": 9.5e-3, "damping": 3e-3})
    assert inner == ["pure_grit at 96 steps: the chosen learning_rate 0.0095 lies at the high edge of [0.0001, 0.01], "
                     "after the 1 extension(s) the study allows"]

