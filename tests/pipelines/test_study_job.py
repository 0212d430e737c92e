"""The trial process's own decisions (pipelines/study/job.py): what its log says a tuning
configuration is, and when a sitting's deadline stops it starting another trial."""

from __future__ import annotations

from pipelines.study.job import sitting_over, tuning_line


def test_a_tuning_extension_says_so_in_its_log_line():
    """Each extension counts its configurations from 1 again: its log line names it, so that
    "configuration 3/16" of a widened search is not read as the first search's third."""
    job = {"method": "pure_grit", "steps": 96, "configurations": 16, "extension": 0}
    first = tuning_line(job, 2, {"learning_rate": 0.001})
    assert first == '[study] tune pure_grit at 96 steps, configuration 3/16: {"learning_rate": 0.001}'
    widened = tuning_line({**job, "extension": 1}, 2, {"learning_rate": 0.001})
    assert widened.startswith("[study] tune pure_grit at 96 steps, extension 1 (widened ranges), configuration 3/16")


def test_a_job_starts_no_trial_its_longest_so_far_says_would_end_past_the_deadline():
    """A sitting's MINUTES is when its trials should end: with 10 minutes left, a job whose
    longest trial took 12 starts no other; one whose trials took 5 does; the first trial of a
    job always starts, and a sitting without a deadline never stops a job."""
    job = {"deadline": 1000.0 + 600}
    assert sitting_over(job, [300.0, 720.0], now=1000.0)
    assert not sitting_over(job, [300.0, 280.0], now=1000.0)
    assert not sitting_over(job, [], now=5000.0), "every job trains at least one trial"
    assert not sitting_over({"deadline": None}, [10_000.0], now=1000.0)
