"""``python -m pipelines.gpu_check``: the GPU check (``cli.py``; ``make gpu-check``)."""

from pipelines.gpu_check.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
