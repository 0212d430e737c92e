"""Where the stages put what other stages read: one name per artifact, as ``dvc.yaml`` declares
them. Paths are relative to the repository root (a stage joins them to ``ctx.root``)."""

from pathlib import Path

BASE_MODEL_MANIFEST = Path("artifacts/base_model.json")   # prepare_model
DATA_DIR = Path("artifacts/data")                         # prepare_data
ADAPTERS = Path("artifacts/adapters")                     # train@<variant>, one folder each
TRAIN_METRICS = Path("metrics/train")                     # train@<variant>, <variant>.json
TRAIN_LIVE = Path("dvclive/train")                        # train@<variant>, the dvclive logs
CHECKPOINTS = Path("outputs/checkpoints")                 # train@<variant>, for resuming
EXPORTS = Path("artifacts/export")                        # export@<variant>, one folder each
SERVE_DIR = Path("artifacts/serve")                       # serve
SERVE_MANIFEST = SERVE_DIR / "manifest.json"              # serve -> evaluate


def adapter_dir(variant: str) -> Path:
    return ADAPTERS / variant


def export_dir(variant: str) -> Path:
    return EXPORTS / variant


def loss_curve(variant: str) -> Path:
    """The training loss per step of ``variant`` as dvclive writes it."""
    return TRAIN_LIVE / variant / "plots/metrics/train/loss.tsv"
