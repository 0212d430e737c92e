"""``python -m pipelines.profile`` writes params.yaml only once the composition passes the schema;
the GPU smoke profile is the smoke profile at other shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.gpu_check.estimates import LLAMA_3_8B
from pipelines.profile import main

SECRET = "s3cret-Profile-pw"


def test_a_password_in_the_composed_store_url_is_refused_and_written_nowhere(tmp_path: Path, capsys):
    output = tmp_path / "params.yaml"
    output.write_text("previous: true\n")
    status = main(["smoke", f"store.url=postgresql+psycopg://grit:{SECRET}@db.example/grit", "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert SECRET not in err
    assert output.read_text() == "previous: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def test_a_valid_composition_replaces_the_file(tmp_path: Path, capsys):
    output = tmp_path / "params.yaml"
    output.write_text("previous: true\n")
    assert main(["smoke", "train.max_steps=3", "--output", str(output)]) == 0
    assert "max_steps: 3" in output.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
    assert "wrote" in capsys.readouterr().err


def test_a_composition_into_a_folder_not_made_yet_makes_it(tmp_path: Path):
    output = tmp_path / "outputs" / "study-params.yaml"      # a fresh clone has no outputs/
    assert main(["smoke", "--output", str(output)]) == 0
    assert "profile: smoke" in output.read_text()


def test_an_unknown_profile_is_refused_by_the_parser(tmp_path: Path):
    with pytest.raises(SystemExit) as stopped:
        main(["no-such-profile", "--output", str(tmp_path / "params.yaml")])
    assert stopped.value.code == 2


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def test_the_gpu_smoke_profile_is_the_smoke_run_at_llama_3_8b_block_shapes(tmp_path: Path):
    """The smoke profile's run in the test suite rehearses the GPU smoke profile on CPU: the two
    compose to the same stages, variants, data and settings, and differ only in the model's shape
    and precision, the adapter's size and the step counts."""
    composed = {}
    for name in ("smoke", "gpu_smoke"):
        assert main([name, "--output", str(tmp_path / f"{name}.yaml")]) == 0
        composed[name] = _flat(yaml.safe_load((tmp_path / f"{name}.yaml").read_text()))
    smoke, gpu = composed["smoke"], composed["gpu_smoke"]
    assert smoke.keys() == gpu.keys()
    differ = {key for key in smoke if smoke[key] != gpu[key]}
    assert differ == {"profile", "model.dtype", "model.tiny.hidden_size", "model.tiny.intermediate_size",
                      "model.tiny.num_attention_heads", "model.tiny.num_key_value_heads", "lora.r", "lora.alpha",
                      "train.max_steps", "train.eval_steps"}
    # Llama-3-8B's blocks, as the GPU guide's estimates take them
    shape = {key.removeprefix("model.tiny."): gpu[key] for key in gpu if key.startswith("model.tiny.")}
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
            shape["num_key_value_heads"]) == (LLAMA_3_8B.hidden, LLAMA_3_8B.mlp, LLAMA_3_8B.heads, LLAMA_3_8B.kv_heads)
    assert (gpu["model.dtype"], gpu["model.load_in_4bit"], gpu["model.source"]) == ("bfloat16", False, "tiny")
