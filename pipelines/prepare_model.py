"""DVC stage ``prepare_model``: resolve the base model and write its manifest.

Reads params section ``model``. Output ``artifacts/base_model.json`` tells every later stage
where the HF directory (training) and the GGUF (serving, when one exists) are.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.files import atomic_write_json
from db.models import Variant
from pipelines.params import Params
from pipelines.paths import BASE_MODEL_MANIFEST
from pipelines.stage import StageContext, run_stage
from trainers.base_model import resolve_base_model
from trainers.hardware import check_hardware


def architecture_summary(hf_dir: Path) -> dict[str, object]:
    config = json.loads((hf_dir / "config.json").read_text())
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return {k: config.get(k) for k in keys}


def preflight(params: Params) -> None:
    # the first stage of `dvc repro`: every setting this machine cannot honour is refused here
    check_hardware(params.model, params.train)


def prepare_model(ctx: StageContext, _checked: None) -> dict[str, Path]:
    files = resolve_base_model(ctx.params.model)
    manifest = {
        **files.to_json(),
        "architecture": architecture_summary(files.hf_dir),
        "model_params": ctx.params.model.model_dump(mode="json"),
    }
    atomic_write_json(ctx.root / BASE_MODEL_MANIFEST, manifest)
    with ctx.store.transaction() as session:
        ctx.store.replace_rows(session, Variant, ctx.run_id, [{
            "engine": "none", "base_model": files.name, "adapter_path": None,
            "details_json": json.dumps(manifest["architecture"]),
        }], name="base", seed=0)
    print(f"[prepare_model] {files.source} base model {files.name} -> {files.hf_dir}")
    return {"base_model_manifest": ctx.root / BASE_MODEL_MANIFEST}


def main(argv: list[str] | None = None) -> int:
    return run_stage("prepare_model", prepare_model, preflight=preflight, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
