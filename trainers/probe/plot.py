"""The probe's figure: where GRIT changed the K-step update, module by module.

One heatmap per GRIT variant (rows: projection kind, columns: transformer block), colour = how
far the update's direction moved from the control's (0, white: GRIT changed nothing there),
and one panel of the per-step median update cosine for every variant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy

_BLOCK = re.compile(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z_0-9]+)$")


def module_grid(names: list[str]) -> tuple[list[str], list[int], dict[str, tuple[int, int]]]:
    """(row labels = projection kinds, column labels = block indices, name -> (row, column))."""
    parsed = {}
    for position, name in enumerate(names):
        match = _BLOCK.search(name.split("[")[0])
        parsed[name] = (match.group(2), int(match.group(1))) if match else (name.rsplit(".", 1)[-1], position)
    kinds = list(dict.fromkeys(kind for kind, _ in parsed.values()))
    blocks = sorted({block for _, block in parsed.values()})
    return kinds, blocks, {n: (kinds.index(k), blocks.index(b)) for n, (k, b) in parsed.items()}


def plot_update_divergence(results: list[dict[str, Any]], threshold: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = len(results) + 1
    figure, axes = plt.subplots(rows, 1, figsize=(11, 2.6 * rows + 0.6), squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=False):
        modules = result["measurements"]["modules"]
        kinds, blocks, where = module_grid([m["name"] for m in modules])
        grid = np.full((len(kinds), len(blocks)), np.nan)
        for m in modules:
            update = m.get("update") or {}
            cosine = update.get("cosine")
            if cosine is not None:
                grid[where[m["name"]]] = np.sqrt(max(0.0, 2 - 2 * cosine))
        image = axis.imshow(grid, aspect="auto", cmap="YlOrRd", vmin=0, vmax=max(1.0, np.nanmax(grid, initial=0)))
        axis.set_yticks(range(len(kinds)), kinds)
        axis.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        axis.set_xlabel("transformer block")
        verdict = result["verdict"].upper()
        why = ", ".join(result["reasons"]) if result["reasons"] else "every check passed"
        axis.set_title(f"{result['variant']}: {verdict} ({why})", fontsize=10,
                       color="tab:green" if result["verdict"] == "effective" else "tab:red")
        for (row, column), value in np.ndenumerate(grid):
            if np.isnan(value) or value < threshold:
                axis.text(column, row, "=", ha="center", va="center", fontsize=7, color="black")
        figure.colorbar(image, ax=axis, label="update direction change")
    trend = axes[-1, 0]
    for result in results:
        per_step = [m["step_update_cosines"] for m in result["measurements"]["modules"] if m["step_update_cosines"]]
        if per_step:
            values = np.array([[np.nan if v is None else v for v in steps] for steps in per_step], dtype=float)
            first = result.get("start_step", 0) + 1     # the window's first step of training
            trend.plot(range(first, first + values.shape[1]), median_per_step(values), marker="o",
                       label=result["variant"])
    trend.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="no change (cosine 1)")
    trend.set_xlabel("optimizer step")
    trend.set_ylabel("median cosine of the step's update\nGRIT vs control")
    trend.legend(fontsize=8)
    figure.suptitle(f"Does GRIT change the updates? ('=': direction change below {threshold:g})", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    partial.replace(path)
    return path


def median_per_step(values: numpy.ndarray) -> numpy.ndarray:
    """Median over modules (rows) of each step (column); NaN, without numpy's all-NaN warning,
    for a step no module has a value for (an update of zero has no direction)."""
    import numpy as np

    medians = np.full(values.shape[1], np.nan)
    measured = ~np.isnan(values).all(axis=0)
    medians[measured] = np.nanmedian(values[:, measured], axis=0)
    return medians
