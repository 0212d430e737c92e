"""Typed params: defaults validate, every bad case gives one line that names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.params import Params, ParamsError, load_params, params_hash, parse_params

BAD_CASES = [
    ({"lora": {"r": 0}}, "lora.r", "greater than 0"),
    ({"lora": {"r": -4}}, "lora.r", "greater than 0"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate", "greater than 0"),
    ({"train": {"learning_rate": -1e-4}}, "train.learning_rate", "greater than 0"),
    ({"lora": {"target_modules": []}}, "lora.target_modules", "at least 1"),
    ({"lora": {"target_modules": ["q_proj", " "]}}, "lora", "empty names"),
    ({"train": {"learning_rte": 1e-4}}, "train.learning_rte", "unknown key"),
    ({"modle": {}}, "modle", "unknown key"),
    ({"train": {"max_steps": "many"}}, "train.max_steps", "valid integer"),
    ({"model": {"source": "ollama"}}, "model.source", "'embedded', 'hf' or 'tiny'"),
    ({"model": {"source": "hf"}}, "model", "needs model_id"),
    ({"model": {"tiny": {"hidden_size": 10, "num_attention_heads": 4}}}, "model.tiny", "multiple"),
    ({"store": {"url": "outputs/centralized.db"}}, "store", "SQLAlchemy URL"),
    # numbers must be numbers: YAML's true/yes/on are booleans, which pydantic would make 1 or 1.0
    ({"train": {"learning_rate": True}}, "train.learning_rate", "not a boolean (got True)"),
    ({"lora": {"r": True}}, "lora.r", "not a boolean (got True)"),
    ({"train": {"max_steps": False}}, "train.max_steps", "not a boolean (got False)"),
    ({"grit": {"damping_escalation": [1, True]}}, "grit.damping_escalation", "numbers, not booleans"),
    ({"lora": {"layers": {"strategy": "specific", "indices": [0, True]}}}, "lora.layers.indices", "boolean"),
    # "base" is the base model's name in the store, in evaluation and in Ollama (base_model)
    ({"variants": {"base": {"engine": "peft"}}}, "variants", "reserved for the base model"),
    ({"profile": "no_such_profile"}, "profile", "unknown profile 'no_such_profile'"),
    ({"export": {"merged": False}}, "serve.weights", "export.merged is false"),
    # the plan's Ollama names: an alias names a declared variant, is a valid name, shadows nothing
    ({"serve": {"aliases": {"unsloth_model": "baseline_lora", "grit_model": "no_such"}}},
     "serve.aliases.grit_model", "'no_such' is not a declared variant"),
    ({"serve": {"aliases": {"pure_grit_model": "peft_lora"}}}, "serve.aliases.pure_grit_model",
     "already registers a model of that name"),
    ({"serve": {"aliases": {"Unsloth Model": "baseline_lora"}}}, "serve.aliases", "not an Ollama model name"),
    ({"eval": {"comparisons": [["pure_grit", "unsloth"]]}}, "eval.comparisons", "'unsloth' is not a declared variant"),
    ({"eval": {"comparisons": [["pure_grit", "peft_lora"]]}}, "eval.comparisons", "already compared (its control)"),
]


def test_defaults_validate_and_hash_is_stable():
    first, second = parse_params({}), parse_params({"lora": {"r": 16}})
    assert first == second == Params()
    assert params_hash(first) == params_hash(second)
    assert params_hash(parse_params({"lora": {"r": 8}})) != params_hash(first)


@pytest.mark.parametrize(("payload", "key", "fragment"), BAD_CASES)
def test_bad_params_give_one_line_naming_the_key(payload, key, fragment):
    with pytest.raises(ParamsError) as caught:
        parse_params(payload, "params.yaml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"params.yaml: {key}"), message
    assert fragment in message


def test_yaml_booleans_are_not_numbers_but_exponents_without_a_dot_are(write_params):
    with pytest.raises(ParamsError, match=r"train.learning_rate: must be a number, not a boolean \(got True\)"):
        load_params(write_params("train:\n  learning_rate: yes\n"))
    with pytest.raises(ParamsError, match=r"lora.alpha: must be a number, not a boolean"):
        load_params(write_params("lora:\n  alpha: on\n"))
    # PyYAML reads 5e-4 (no dot) as a string; it still means the number
    assert load_params(write_params("train:\n  learning_rate: 5e-4\n")).train.learning_rate == 5e-4
    assert load_params(write_params("grit:\n  precondition: no\n")).grit.precondition is False


def test_every_shipped_profile_is_a_valid_profile_value():
    from pipelines.params import available_profiles

    assert {"default", "smoke", "vlm_smoke", "gpu_llama3_8b"} <= set(available_profiles())
    for name in available_profiles():
        assert parse_params({"profile": name}).profile == name


def test_not_yaml_and_missing_file(tmp_path: Path, write_params):
    with pytest.raises(ParamsError, match="not valid YAML at line"):
        load_params(write_params("model: [unclosed\n"))
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_shipped_params_and_profiles_validate(repo_root: Path):
    params = load_params(repo_root / "params.yaml")
    assert params.profile == "default" and params.model.source == "embedded"


@pytest.mark.parametrize(("payload", "key"), [
    ({"lora": {"r": 0}}, "lora.r"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"model": {"source": "tiny", "load_in_4bit": True}}, "model.load_in_4bit"),
])
def test_stage_rejects_bad_params_before_touching_the_store(tmp_path: Path, repo_root: Path, payload, key):
    db = tmp_path / "store.db"
    payload = {**payload, "store": {"url": f"sqlite:///{db}"}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(payload))
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare_model", "--params", str(params)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert not db.exists(), "a rejected run must not create or write the results store"
    assert not (tmp_path / "artifacts").exists()


def test_one_source_of_defaults_the_config_classes_are_the_default_profile(repo_root, tmp_path):
    """Every setting the code has is in conf/profile/default.yaml with the same default, and
    nothing is there that the code lacks; the committed params.yaml is that profile composed."""
    from pipelines.profile import compose_params

    composed = tmp_path / "params.yaml"
    compose_params("default", composed)
    assert yaml.safe_load(composed.read_text()) == Params().model_dump(mode="json")
    assert yaml.safe_load((repo_root / "params.yaml").read_text()) == yaml.safe_load(composed.read_text())


@pytest.mark.parametrize(("payload", "key"), [
    ({"grit": {"truncate": True}}, "grit.truncate"),
    ({"variants": {"pure_grit": {"engine": "peft", "grit": True, "grit_overrides": {"truncate": True}}}},
     "variants.pure_grit.grit_overrides.truncate"),
])
def test_truncation_is_refused_under_data_parallelism(payload, key):
    with pytest.raises(ParamsError) as caught:
        parse_params({**payload, "train": {"nproc_per_node": 2}}, "params.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"params.yaml: {key} is true"), message
    assert "train.nproc_per_node is 2" in message
    parse_params(payload)                                           # one process: fine
    parse_params({"grit": {"truncate": True}, "train": {"nproc_per_node": 2},
                  "variants": {"peft_lora": {"engine": "peft"}}})   # no GRIT variant: fine


@pytest.mark.parametrize("variant, expected", [
    ({"engine": "peft", "grit": True, "grit_overrides": {"dampng": 0.1}},
     "variants.grit_paper: grit_overrides: 'dampng' is not a field of the grit section"),
    ({"engine": "peft", "grit": True, "grit_overrides": {"damping": -1}},
     "variants.grit_paper.grit_overrides: damping: Input should be greater than 0"),
    ({"engine": "peft", "grit": False, "grit_overrides": {"damping": 0.1}},
     "variants.grit_paper: grit_overrides is set but grit is false"),
])
def test_a_variants_grit_overrides_are_validated_in_one_line(variant, expected):
    with pytest.raises(ParamsError) as caught:
        parse_params({"variants": {"grit_paper": variant}}, "params.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"params.yaml: {expected}"), message


def test_a_variant_trains_with_its_overrides_and_the_grit_section_elsewhere():
    from trainers.config import variant_grit

    params = parse_params({"grit": {"damping": 0.01}, "variants": {
        "grit_paper": {"engine": "peft", "grit": True, "control": "peft_lora",
                       "grit_overrides": {"reprojection": True, "truncate": True}},
        "pure_grit": {"engine": "peft", "grit": True, "control": "peft_lora"}, "peft_lora": {"engine": "peft"}}})
    paper, pure = (variant_grit(params.grit, params.variants[v]) for v in ("grit_paper", "pure_grit"))
    assert paper.reprojection and paper.truncate and paper.damping == 0.01
    # auto, resolved for PEFT
    assert pure == params.grit.model_copy(update={"capture": "hooks", "fused_lora_dtype": "adapter"})


def test_study_methods_must_be_declared_variants():
    with pytest.raises(ParamsError, match="study.methods: 'grit_papr' is not a declared variant"):
        parse_params({"study": {"methods": ["peft_lora", "grit_papr"]}}, "params.yaml")
    with pytest.raises(ParamsError, match="a method is listed twice"):
        parse_params({"study": {"methods": ["peft_lora", "peft_lora"]}}, "params.yaml")


def test_a_variant_with_other_lora_settings_is_no_candidate_control():
    """A DoRA (or rank-8) variant cannot be a GRIT variant's control, so declaring one beside a GRIT
    variant asks for no control."""
    params = parse_params({"variants": {"pure_grit": {"engine": "peft", "grit": True},
                                        "peft_dora": {"engine": "peft", "lora_overrides": {"use_dora": True}}}})
    assert params.variants["pure_grit"].control is None


@pytest.mark.parametrize("variants, expected", [
    ({"pure_grit": {"engine": "peft", "grit": True}, "peft_lora": {"engine": "peft"}},
     "variants.pure_grit: a GRIT variant names its control, a declared variant without GRIT on the same engine "
     "(e.g. control: peft_lora)"),
    ({"pure_grit": {"engine": "peft", "grit": True, "control": "peft_lroa"}, "peft_lora": {"engine": "peft"}},
     "variants.pure_grit.control: 'peft_lroa' is not a declared variant (pure_grit, peft_lora)"),
    ({"pure_grit": {"engine": "peft", "grit": True, "control": "baseline_lora"},
      "baseline_lora": {"engine": "unsloth"}},
     "variants.pure_grit.control: baseline_lora must train without GRIT on the peft engine, as pure_grit does"),
    ({"pure_grit": {"engine": "peft", "grit": True, "control": "peft_lora"},
      "peft_lora": {"engine": "peft", "lora_overrides": {"r": 8}}},
     "variants.pure_grit.control: peft_lora has other LoRA settings than pure_grit (lora_overrides)"),
    ({"peft_lora": {"engine": "peft", "lora_overrides": {"rank": 8}}},
     "variants.peft_lora: lora_overrides: 'rank' is not a field of the lora section"),
    ({"peft_lora": {"engine": "peft", "lora_overrides": {"r": 0}}},
     "variants.peft_lora.lora_overrides: r: Input should be greater than 0"),
    ({"baseline_dora": {"engine": "unsloth", "lora_overrides": {"use_dora": True}}},
     "variants.baseline_dora: DoRA (use_dora) trains on the peft engine without GRIT"),
    ({"peft_lora": {"engine": "peft", "control": "base"}},
     "variants.peft_lora: control is set but grit is false"),
])
def test_controls_and_lora_overrides_are_declared_and_checked_in_one_line(variants, expected):
    with pytest.raises(ParamsError) as caught:
        parse_params({"variants": variants}, "params.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"params.yaml: {expected}"), message


def test_a_rank_8_or_dora_variant_is_a_params_change():
    from trainers.config import variant_lora

    params = parse_params({"variants": {"peft_lora": {"engine": "peft"},
                                        "peft_lora_r8": {"engine": "peft", "lora_overrides": {"r": 8}},
                                        "peft_dora": {"engine": "peft", "lora_overrides": {"use_dora": True}}}})
    assert variant_lora(params.lora, params.variants["peft_lora_r8"]).r == 8
    assert variant_lora(params.lora, params.variants["peft_lora"]) == params.lora
    dora = variant_lora(params.lora, params.variants["peft_dora"])
    assert dora.use_dora and dora.r == params.lora.r


def test_default_aliases_follow_the_declared_variants_and_written_ones_are_checked():
    from pipelines.params import served_aliases

    assert served_aliases(Params()) == {"unsloth_model": "baseline_lora", "grit_model": "hybrid_grit"}
    own = parse_params({"variants": {"pure_grit": {"engine": "peft", "grit": True, "control": "peft_lora"},
                                     "peft_lora": {"engine": "peft"}}})
    assert served_aliases(own) == {}          # defaults naming undeclared variants are not registered
    with pytest.raises(ParamsError, match="'hybrid_grit' is not a declared variant"):
        parse_params({"variants": own.model_dump()["variants"],
                      "serve": {"aliases": {"grit_model": "hybrid_grit"}}}, "params.yaml")
