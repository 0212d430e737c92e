"""One decoding definition, proven on the real server: the real SmolLM2-135M with a LoRA adapter
(random B, so the adapter matters), served in both forms from our Modelfiles (base + ADAPTER, and
the merged GGUF), asked 20 prompts of the evaluation's sets greedily through Ollama and through
llama-cpp-python on the same files. The options ``ollama show`` holds are exactly the evaluation's
(``export.decoding``); the replies agree as ``evaluation.agreement`` measures (printed with ``-s``).

Both engines run on one thread: with one thread each sums in the same order, so a disagreement
is a difference of definition (a penalty, a template, a stop), not of float order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.agreement import reply_agreement
from export.decoding import GREEDY, llama_cpp_sampling
from export.ollama import OllamaModel
from export.ollama_server import check_greedy, create

pytestmark = pytest.mark.slow       # the real 135M model, converted and merged


def evaluation_prompts(harmful: int = 10, edgy: int = 10) -> list[str]:
    """The first prompts of the evaluation's harmful and edgy-benign sets, from their packages."""
    from trainers.data.sources import rho_overrefusal_prompts, rho_refusal_pairs

    return ([p.harmful for p in rho_refusal_pairs()[:harmful]]
            + [p.text for p in rho_overrefusal_prompts()[:edgy]])


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """SmolLM2-135M + a random-B LoRA (r 8, q/v), as the export writes it: llama.cpp's adapter
    GGUF on the embedded Q4_1 base, and the merged GGUF in the export's default quantization."""
    import torch
    from peft import LoraConfig, get_peft_model

    from export.adapter import convert_adapter, folded_adapter
    from export.chat_format import chat_format
    from export.config import ExportParams
    from export.gguf import merged_gguf
    from export.modelfile import ServedModel
    from trainers.base_model import embedded_gguf_path, load_causal_lm, load_tokenizer, resolve_base_model
    from trainers.config import ModelParams

    folder, params = tmp_path_factory.mktemp("real-export"), ModelParams()
    files = resolve_base_model(params)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(files, params), LoraConfig(r=8, lora_alpha=16,
                                                                      target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    model.save_pretrained(folder / "adapter")
    adapter = convert_adapter(folded_adapter(folder / "adapter", folder / "folded"), files.hf_dir,
                              folder / "adapter.gguf")
    merged = merged_gguf(files, adapter, folder / "merged.gguf", ExportParams().merged_quantization)
    return ServedModel(name="real_model", variant="random_lora", base_gguf=embedded_gguf_path(),
                       chat=chat_format(load_tokenizer(files, params)), adapter_gguf=adapter, merged_gguf=merged,
                       parameters={"seed": 0, "num_predict": 32, "num_ctx": 2048, "num_thread": 1})


def test_the_request_and_llama_cpp_state_the_same_greedy_options():
    assert llama_cpp_sampling() == {("temp" if k == "temperature" else k): v for k, v in GREEDY.items()}


@pytest.mark.parametrize("form", ["adapter", "merged"])
def test_ollama_replies_agree_with_llama_cpp_on_the_same_file(server, real_export, form: str, tmp_path: Path):
    from export.backend import LlamaCppModel

    name = f"real_{form}"
    (tmp_path / "Modelfile").write_text(real_export.modelfile(form))
    create(server, name, tmp_path / "Modelfile")
    check_greedy(server, name, tmp_path / "Modelfile")       # every greedy option exactly as stated
    model, adapter = real_export.weights(form)
    assert (adapter is not None) == (form == "adapter")
    prompts = evaluation_prompts()
    ollama = OllamaModel(server.url, name)
    through_ollama = [ollama.generate(p, 32).text for p in prompts]
    llm = LlamaCppModel(model, real_export.chat, adapter, n_threads=1)
    through_llama_cpp = [llm.generate(p, 32).text for p in prompts]
    llm.close()
    agreement = reply_agreement(through_ollama, through_llama_cpp)
    print(f"\n[agreement] {form}: {json.dumps(agreement.as_dict())}")
    assert agreement.replies == 20 >= len(set(through_llama_cpp)) > 10       # real, varied replies
    # measured on this machine kind: 20 of 20 whole replies equal in both forms (the margin is for
    # a near-tie on another CPU)
    assert min(agreement.same_opening, agreement.same_verdict, agreement.same_reply) >= 0.9, agreement
