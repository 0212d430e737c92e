"""DVC stage ``compare``: the comparison report of this run (``python -m evaluation.compare_all``).

Writes ``reports/compare.md``, ``reports/compare.csv`` and ``reports/compare_<metric>.png`` for
the run the current params define, from the results store; the last stage of the pipeline, so
recording it is what makes the run complete. ``python -m evaluation.compare_all`` prints the same
report for the latest complete run (or ``--run ID``) at any time.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.params import Params, require_text_model
from pipelines.stage import StageContext, run_stage

CSV = Path("reports/compare.csv")


def compare(ctx: StageContext, _checked) -> dict[str, Path]:
    from db.config import store_url
    from evaluation.compare_all import load_run, write_outputs

    # ctx.params records the URL without its password; $GRIT_STORE_URL may hold it.
    text, written = write_outputs(load_run(store_url(ctx.params.store), ctx.store_root, ctx.run_id), ctx.root,
                                  ctx.root / CSV)
    print(text)
    return written


def preflight(params: Params) -> None:
    require_text_model(params, "compare")


def main(argv: list[str] | None = None) -> int:
    return run_stage("compare", compare, preflight=preflight, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
