"""Exported GGUFs compute what the PEFT model computes, on the real embedded SmolLM2 (Q4_1).

The parity adapter is random but strong (it moves the next-token distribution far more than
Q4_1 quantisation does), so a wrong LoRA scale cannot hide inside the quantisation noise; the
generation checks use a mild one, which leaves the model able to answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from export.adapter import convert_adapter, folded_adapter
from export.backend import LlamaCppModel
from export.chat_format import chat_format
from export.config import ExportParams
from export.gguf import merged_gguf
from export.parity import greedy_agrees, next_token_parity, peft_next_token_logits
from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
from trainers.config import ModelParams
from trainers.data.sources import rho_refusal_pairs

pytestmark = pytest.mark.slow
MIN_AGREEMENT, MAX_MEAN_KL = 0.95, 0.02
MERGED = ExportParams().merged_quantization
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    params = ModelParams(source="embedded")
    files = resolve_base_model(params)
    tokenizer = load_tokenizer(files, params)
    chat = chat_format(tokenizer)
    for kind, std in (("mild", 0.01), ("adapter", 0.1)):   # the strong one stays loaded for the reference
        torch.manual_seed(0)
        model = get_peft_model(load_causal_lm(files, params), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=std)
        model.save_pretrained(folder / kind)
    # 20 held-out prompts, harmful and benign alternating (the evaluation set, never trained on)
    prompts = [text for pair in rho_refusal_pairs()[:10] for text in (pair.harmful, pair.benign)]
    reference = peft_next_token_logits(model, tokenizer, prompts, chat)
    with torch.no_grad():
        with model.disable_adapter():
            unadapted = peft_next_token_logits(model, tokenizer, prompts, chat)
    adapter = convert_adapter(folded_adapter(folder / "adapter", folder / "folded"), files.hf_dir, folder / "a.gguf")
    mild = convert_adapter(folded_adapter(folder / "mild", folder / "folded-mild"), files.hf_dir, folder / "mild.gguf")
    return {"files": files, "chat": chat, "prompts": prompts, "reference": reference, "unadapted": unadapted,
            "adapter": adapter, "mild": mild, "folder": folder, "tokenizer": tokenizer}


def served_logits(model_file: Path, exported, adapter: Path | None) -> list:
    llm = LlamaCppModel(model_file, exported["chat"], adapter)
    logits = [llm.next_token_logits(p) for p in exported["prompts"]]
    llm.close()
    return logits


def test_the_adapter_matters_far_more_than_quantisation(exported):
    shift = next_token_parity(exported["reference"], exported["unadapted"])
    assert shift.mean_kl > 5 * MAX_MEAN_KL, shift.describe()


def test_base_plus_adapter_gguf_matches_peft(exported):
    parity = next_token_parity(exported["reference"],
                               served_logits(exported["files"].gguf_path, exported, exported["adapter"]))
    print(parity.describe())
    assert parity.passes(MIN_AGREEMENT, MAX_MEAN_KL), parity.describe()


def test_merged_gguf_matches_peft(exported):
    merged = merged_gguf(exported["files"], exported["adapter"], exported["folder"] / "merged.gguf", MERGED)
    parity = next_token_parity(exported["reference"], served_logits(merged, exported, None))
    print(parity.describe())
    assert parity.passes(MIN_AGREEMENT, MAX_MEAN_KL), parity.describe()


def test_a_wrong_scaling_fails_the_parity_check(exported):
    folder = exported["folder"]
    wrong = convert_adapter(folded_adapter(folder / "adapter", folder / "folded-x2", scale_factor=2.0),
                            exported["files"].hf_dir, folder / "wrong.gguf")
    parity = next_token_parity(exported["reference"], served_logits(exported["files"].gguf_path, exported, wrong))
    assert not parity.passes(MIN_AGREEMENT, MAX_MEAN_KL), parity.describe()


def test_served_prompts_are_the_training_tokens_and_generation_stops_at_end_of_turn(exported):
    files, chat, tokenizer = exported["files"], exported["chat"], exported["tokenizer"]
    merged = merged_gguf(files, exported["mild"], exported["folder"] / "merged-mild.gguf", MERGED)
    for model_file, adapter in ((files.gguf_path, None), (files.gguf_path, exported["mild"]), (merged, None)):
        llm = LlamaCppModel(model_file, chat, adapter)
        prompt = "What is the capital of France? Answer in one sentence."
        expected = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=True)["input_ids"]
        assert llm.prompt_tokens(prompt) == list(expected)
        generation = llm.generate(prompt, 96)
        llm.close()
        assert generation.stopped_at_end_of_turn and "<|im_" not in generation.text, generation


def test_a_near_tie_flip_agrees_and_a_real_flip_does_not():
    reference = np.log(np.array([0.50, 0.48, 0.02]))           # top two 0.04 nats apart
    near_tie = np.log(np.array([0.48, 0.50, 0.02]))            # served flips them
    real_flip = np.log(np.array([0.20, 0.78, 0.02]))
    far = np.log(np.array([0.70, 0.10, 0.20]))
    lopsided = np.log(np.array([0.90, 0.05, 0.05]))
    assert greedy_agrees(reference, near_tie, tie_margin=0.1)
    assert not greedy_agrees(reference, near_tie, tie_margin=0.0)   # exact agreement
    assert not greedy_agrees(lopsided, real_flip, tie_margin=0.1)    # 2.9 nats below the best
    parity = next_token_parity([reference, lopsided, far], [near_tie, real_flip, far], tie_margin=0.1)
    assert parity.agreement == pytest.approx(2 / 3) and parity.exact_agreement == pytest.approx(1 / 3)
