"""Training figures the evaluation stores beside the served speeds: time, throughput, peak host
memory and, on a GPU, peak CUDA memory (``backend = train`` rows of ``speed_metrics``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from evaluation.compare_all import RunTables, speed_table
from pipelines.evaluate import training_speed


def test_peak_cuda_memory_is_stored_when_training_measured_it(tmp_path: Path):
    folder = tmp_path / "metrics/train"
    folder.mkdir(parents=True)
    (folder / "pure_grit.json").write_text(json.dumps({
        "train_seconds": 10.0, "tokens_per_second": 5.0, "peak_rss_mib": 100.0, "peak_cuda_mib": 2048.5,
        "seeds": {"43": {"train_seconds": 11.0, "tokens_per_second": 4.0, "peak_rss_mib": 90.0,
                         "peak_cuda_mib": None}}}))
    assert training_speed(tmp_path, "pure_grit", 42) == {"train_seconds": 10.0, "tokens_per_second": 5.0,
                                                         "peak_rss_mib": 100.0, "peak_cuda_mib": 2048.5}
    assert "peak_cuda_mib" not in training_speed(tmp_path, "pure_grit", 43)     # a CPU replicate: none


def test_compare_all_shows_the_peak_cuda_memory_row():
    tables = RunTables(SimpleNamespace(id="r"), ["base", "pure_grit"], {},
                       {("pure_grit", "peak_cuda_mib"): [SimpleNamespace(value=2048.5)]}, [])
    assert ["training peak CUDA memory (MiB)", "n/a", "2048.5"] in speed_table(tables)
