"""The GPU check's CPU side: its pass/fail rules and report, its one-line exit where no CUDA device
is visible, its registry of items, the profiling harness (``profiling/``) it shares with
``benchmarks/grit_overhead.py``, and a CPU rehearsal of its plumbing (the real Unsloth engine, the
probe, GRIT's fp32 statistics under a bf16 model) so a broken item is caught here, not on a
rented GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.gpu_check.report import (
    CHECKS,
    EXIT_FAILED,
    EXIT_NO_CUDA,
    EXIT_PASSED,
    PEAK_MEMORY_TARGET,
    STEP_TIME_TARGET,
    exit_code,
    headline,
    judge,
    report,
    table,
)
from profiling.phases import STEP_PHASES
from profiling.timing import interleaved_step_times

REPO = Path(__file__).resolve().parents[2]
GOOD_PROBE = {"verdict": "effective", "reasons": [], "modules": 14, "modules_covered_step1": 14,
              "update_cosine_median": 0.7}


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipelines.gpu_check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_working_hybrid_passes_and_each_way_of_failing_is_named():
    cuda = {**GOOD_PROBE, "device": "cuda", "missing_internals": [],
            "fused_kernels": {"qkv": 2, "o": 2, "mlp": 2, "total": 6}}
    assert judge("hybrid", cuda).passed
    moved = judge("hybrid", {**cuda, "missing_internals": ["_fused_lora_modules"]})
    assert (not moved.passed
            and "Unsloth internals the project relies on are gone: _fused_lora_modules" in moved.failures[0])
    unfused = judge("hybrid", {**cuda, "fused_kernels": {"total": 0}})
    assert not unfused.passed and "no fused LoRA kernel" in unfused.failures[0]
    blind = judge("hybrid", {**cuda, "modules_covered_step1": 0, "verdict": "inert", "reasons": ["capture_bypassed"]})
    assert blind.failures == ["GRIT captured rows on 0/14 LoRA modules in step 1",
                              "probe verdict 'inert' (capture_bypassed)"]
    assert judge("hybrid", {**GOOD_PROBE, "device": "cpu", "missing_internals": [], "fused_kernels": {}}).passed


def test_truncation_must_shrink_train_on_and_reload_faithfully():
    good = {"modules": 14, "modules_truncated": 14, "steps_after_truncation": 4, "losses_finite": True,
            "reload_shapes_equal": True, "reload_max_logit_difference": 0.0078}
    assert judge("truncation", good).passed
    assert judge("truncation", {**good, "modules_truncated": 0}).failures == [
        "GRIT truncated no module (the path under test did not run)"]
    assert "no training step ran after" in judge("truncation", {**good, "steps_after_truncation": 0}).failures[0]
    assert "not finite" in judge("truncation", {**good, "losses_finite": False}).failures[0]
    assert "shapes differ" in judge("truncation", {**good, "reload_shapes_equal": False}).failures[0]
    assert "other logits" in judge("truncation", {**good, "reload_max_logit_difference": 0.5}).failures[0]


def test_qlora_needs_nf4_layers_and_a_faithful_reload():
    good = {**GOOD_PROBE, "nf4_layers": 14, "reload_weights_equal": True, "reload_max_logit_difference": 0.0}
    assert judge("qlora", good).passed
    assert "not loaded in NF4" in judge("qlora", {**good, "nf4_layers": 0}).failures[0]
    assert "other logits" in judge("qlora", {**good, "reload_max_logit_difference": 0.5}).failures[0]
    assert "differ from the trained ones" in judge("qlora", {**good, "reload_weights_equal": False}).failures[0]


def test_bf16_precision_rules():
    good = {"statistics_dtypes": ["torch.float32"], "all_finite": True, "min_cosine": 0.999,
            "max_relative_difference": 0.02, "modules": 14}
    assert judge("bf16", good).passed
    assert "not fp32" in judge("bf16", {**good, "statistics_dtypes": ["torch.bfloat16", "torch.float32"]}).failures[0]
    assert "not finite" in judge("bf16", {**good, "all_finite": False}).failures[0]
    assert "min cosine" in judge("bf16", {**good, "min_cosine": 0.9}).failures[0]
    assert "max relative difference" in judge("bf16", {**good, "max_relative_difference": 0.5}).failures[0]


def test_overhead_targets_are_the_stated_ones():
    within = {"step_time_ratio": STEP_TIME_TARGET - 0.01, "peak_memory_ratio": PEAK_MEMORY_TARGET}
    assert judge("overhead", {"engines": {"peft": within, "unsloth": within}}).passed
    slow = judge("overhead", {"engines": {"peft": {**within, "step_time_ratio": 1.2},
                                          "unsloth": {**within, "peak_memory_ratio": None}}})
    assert slow.failures == [f"peft: step time GRIT/LoRA 1.2 > {STEP_TIME_TARGET}",
                             "unsloth: peak memory GRIT/LoRA not measured"]
    assert not judge("overhead", {"engines": {}}).passed
    counted = {**within, "grit_host_syncs": 3, "grit_steps_watched": 10}
    syncing = judge("overhead", {"engines": {"peft@smollm2": counted}})
    assert syncing.failures == ["peft@smollm2: 3 host synchronisations in 10 GRIT steps (target 0)"]
    # a run pays GRIT's inversions: the mean over the timed steps is judged where it was recorded
    inverting = {**within, "mean_step_time_ratio": 1.3}
    assert judge("overhead", {"engines": {"peft": inverting}}).failures == \
        [f"peft: mean step time GRIT/LoRA 1.3 > {STEP_TIME_TARGET}"]
    assert "time x1.04 (mean x1.3)" in headline(judge("overhead", {"engines": {"peft": inverting}}))
    split = {**within, "compile_off_ratio": 1.12, "grit_over_uncompiled_lora": 1.04}
    assert "(leaving Unsloth's compile x1.12, GRIT over uncompiled LoRA x1.04)" in \
        headline(judge("overhead", {"engines": {"unsloth@llama-1b": split}}))
    # a GRIT arm on another capture path than its engine's says so; the engine's own says nothing
    def line(capture: str) -> str:
        return headline(judge("overhead", {"engines": {"peft": {**within, "grit_capture": capture}}}))

    assert ", GRIT capture fused" in line("fused") and "capture" not in line("auto")


def test_only_synchronising_calls_count_as_host_syncs():
    """torch's sync debug mode warns at every synchronising call, and once per process that the
    mode is a prototype: that notice is no synchronisation (it was the "1 in 10 GRIT steps" of the
    H100 and H200 reports)."""
    from pipelines.gpu_check.items import is_host_sync_warning

    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
              "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1050.)")
    assert not is_host_sync_warning(notice)
    assert is_host_sync_warning("called a synchronizing CUDA operation (Triggered internally at "
                                "/pytorch/c10/cuda/CUDAFunctions.cpp:154.)")


def test_the_profile_line_names_the_kernels_that_differ_most_whatever_order_the_report_keeps():
    """The check writes its JSON with sorted keys, which orders the kernels by name: the line
    ranks them itself (the H200's line named a 0.016 ms kernel before a 0.155 ms one)."""
    from pipelines.gpu_check.report import profile_line

    by_name = {"a_small": 0.0157, "b_large": 0.155, "c_negative": -0.5}
    line = profile_line({"grit_minus_lora": {"host_ms": {"forward": 1.0}, "host_ms_total": 1.0,
                                             "kernels_ms": by_name}})
    assert "(most: c_negative -0.5, b_large +0.155)" in line


def test_the_lora_arm_can_run_grits_fused_functions_without_grit(tmp_path: Path, monkeypatch):
    """``--lora-functions fused``: GRIT through its fused functions on PEFT is timed against LoRA
    through the same functions (they run fewer operations than PEFT's forward, which would flatter
    GRIT's ratio). On Unsloth the LoRA arm is Unsloth's own fused kernels whatever was asked, and
    the figures say what each engine ran."""
    from pipelines.gpu_check.items import overhead_model, sized_batches
    from pipelines.gpu_check.sizing import OVERHEAD_SHAPES, Sizing
    from trainers.grit.layer import lora_layers

    monkeypatch.setitem(OVERHEAD_SHAPES, "smollm2", {"hidden_size": 64, "intermediate_size": 128,
                                                     "num_hidden_layers": 2, "num_attention_heads": 4,
                                                     "num_key_value_heads": 2})

    def lora_arm(functions: str):
        sizing = Sizing(steps=1, batch=1, length=16, lora_functions=functions)
        model, step = overhead_model(tmp_path / functions, "peft", False, "cpu", "smollm2", sizing)
        step(next(sized_batches(sizing, 1, "cpu")))
        layers = [layer for _, layer, _ in lora_layers(model)]
        return layers, [p.grad for p in model.parameters() if p.requires_grad]

    fused, fused_grads = lora_arm("fused")
    assert fused and all("forward" in layer.__dict__ for layer in fused), "every LoRA layer runs the fused function"
    assert all(grad is None for grad in fused_grads), "the step ran to zero_grad"
    engine, _ = lora_arm("engine")
    assert not any("forward" in layer.__dict__ for layer in engine), "PEFT's own forward by default"
    assert Sizing(lora_functions="fused").for_engine("unsloth").lora_functions == "engine"
    assert Sizing(lora_functions="fused").for_engine("peft").figures()["lora_functions"] == "fused"
    within = {"step_time_ratio": 1.0, "peak_memory_ratio": 1.0, "lora_functions": "fused"}
    assert ", LoRA through GRIT's fused functions" in headline(judge("overhead", {"engines": {"peft": within}}))


def test_a_cpu_rehearsal_of_the_profile_item_measures_every_phase(tmp_path: Path, monkeypatch):
    """The profile item on CPU, PEFT engine, a few tokens, at a tiny width of SmolLM2's layout (the
    item's code path; the real width only makes it slower here): both arms' phases are measured,
    each phase's operator calls are counted, GRIT's before_step (not LoRA's clipping) runs in
    GRIT's arm, and the report's line says what GRIT adds. Run through the registry as the worker
    process runs it, with the adapter-dtype setting passed on, and GRIT's fused functions on
    PEFT's engine (``--grit-capture fused``)."""
    from pipelines.gpu_check.items import REGISTRY
    from pipelines.gpu_check.sizing import OVERHEAD_SHAPES, Sizing

    monkeypatch.setitem(OVERHEAD_SHAPES, "smollm2", {"hidden_size": 64, "intermediate_size": 128,
                                                     "num_hidden_layers": 2, "num_attention_heads": 4,
                                                     "num_key_value_heads": 2})
    figures = REGISTRY["overhead-profile"]("overhead-profile", "peft:smollm2", tmp_path, "cpu",
                                           Sizing(steps=2, batch=1, length=16, adapter_dtype="model",
                                                  grit_capture="fused"))
    assert figures["adapter_dtype"] == "model" and figures["grit_capture"] == "fused" and figures["steps"] == 2
    for arm in ("lora", "grit"):
        assert set(figures[arm]["host_ms"]) == set(STEP_PHASES)
        assert all(figures[arm]["host_ms"][name] > 0 for name in ("forward", "backward", "grit_before", "optimizer"))
        assert figures[arm]["device_ms"] is None
        assert all(figures[arm]["host_ms_slowest"][name] >= figures[arm]["host_ms"][name] for name in STEP_PHASES)
    # counted, not timed (a sub-0.1 ms wall-clock comparison of the after-step phases was noise):
    # GRIT's before_step, not LoRA's clipping, ran in GRIT's arm; LoRA's after-step phase is empty
    operators = {arm: figures[arm]["host_ops"] for arm in ("lora", "grit")}
    assert set(operators["grit"]) == set(STEP_PHASES) and operators["lora"]["grit_after"] == 0
    assert operators["grit"]["grit_before"] != operators["lora"]["grit_before"] > 0
    assert all(operators[arm][name] > 0 for arm in operators for name in ("forward", "backward", "optimizer"))
    assert figures["grit_minus_lora"]["host_ops"]["grit_before"] == \
        operators["grit"]["grit_before"] - operators["lora"]["grit_before"]
    assert all(set(figures[arm]["garbage_collections"]) == {"per_step", "ms_per_step", "full"}
               for arm in ("lora", "grit"))
    item = judge("profile", {"engines": {"peft@smollm2": figures}})
    assert item.passed and headline(item).startswith("peft@smollm2: host ")
    assert ", operator calls +" in headline(item)
    assert " per step, garbage collection GRIT " in headline(item)
    assert judge("profile", {"engines": {"peft@smollm2": {"lora": figures["lora"]}}}).failures == \
        ["peft@smollm2: grit arm not profiled"]
    blind = {**figures, "grit": {**figures["grit"], "device_ms": 0.0, "kernel_launches": 0.0}}
    assert judge("profile", {"engines": {"peft@smollm2": blind}}).failures == \
        ["peft@smollm2: grit arm's kernels not found in the profile"]


def test_report_table_and_exit_codes():
    items = [judge("bf16", {"statistics_dtypes": ["torch.float32"], "all_finite": True, "min_cosine": 0.999,
                            "max_relative_difference": 0.02, "modules": 3}),
             judge("qlora", None, not_run="bitsandbytes NF4 needs CUDA"),
             judge("hybrid", None, error="ImportError: no module named unsloth")]
    assert [i.passed for i in items] == [True, None, False]
    assert exit_code(items[:1]) == EXIT_PASSED and exit_code(items[:2]) == EXIT_FAILED   # not run is no pass
    assert exit_code(items) == EXIT_FAILED and exit_code([]) == EXIT_FAILED
    text = table(items)
    assert "| bf16 model, fp32 GRIT statistics | PASS | min cosine 0.999" in text
    assert "| NF4 base (bitsandbytes) + LoRA + GRIT | not run | bitsandbytes NF4 needs CUDA |" in text
    assert "| FAIL | the check itself failed: ImportError: no module named unsloth |" in text
    payload = json.loads(json.dumps(report(items, {"device": "cpu"})))
    assert payload["passed"] is False and payload["targets"]["step_time_ratio"] == STEP_TIME_TARGET
    assert [i["name"] for i in payload["items"]] == ["bf16", "qlora", "hybrid"]


def test_without_a_gpu_the_check_exits_with_one_line_and_its_own_code(tmp_path: Path):
    import torch

    assert not torch.cuda.is_available(), "this test is for machines without CUDA"
    done = _check("--out", str(tmp_path / "report.json"))
    assert done.returncode == EXIT_NO_CUDA
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA device: make gpu-check needs an NVIDIA GPU that torch can see (torch.cuda.is_available() "
        "is False); see docs/gpu.md"]
    assert not (tmp_path / "report.json").exists()
    unknown = _check("--items", "hybrid,warp")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"error: unknown item 'warp'; choose from {', '.join(CHECKS)}"


def test_an_nf4_base_reaches_every_arms_process_and_is_refused_without_cuda(tmp_path: Path):
    """``--base nf4`` (the hybrid on a 4-bit base, GRIT's fused functions de-quantising per
    product, whose memory the overhead item measures against Unsloth's own 4-bit LoRA) travels to
    each item process with the rest of the sizing, the figures and the table say it, and a CPU
    rehearsal refuses it in one line, before anything runs."""
    import argparse

    from pipelines.gpu_check.sizing import Sizing

    sizing = Sizing(steps=3, batch=2, length=64, base="nf4")
    parser = argparse.ArgumentParser()
    Sizing.add_arguments(parser)
    assert Sizing.from_args(parser.parse_args(sizing.argv())) == sizing
    assert Sizing.from_args(parser.parse_args([])).base == "model"
    assert sizing.for_shape("llama-8b-layers").for_engine("unsloth").figures()["base"] == "nf4"
    within = {"step_time_ratio": 1.0, "peak_memory_ratio": 1.0, "base": "nf4"}
    assert ", base in NF4" in headline(judge("overhead", {"engines": {"unsloth": within}}))
    refused = _check("--device", "cpu", "--items", "overhead", "--base", "nf4", "--out", str(tmp_path / "r.json"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --base nf4 needs CUDA (bitsandbytes loads the NF4 base onto the GPU); "
        "a cpu rehearsal runs --base model"]
    assert not (tmp_path / "r.json").exists()


def test_the_registry_serves_every_item_of_the_check_and_nothing_else(tmp_path: Path):
    """The orchestrator's items are report.CHECKS' (it does not import the heavy items module):
    the registry's kinds serve exactly those, in that order; an unknown kind stops the worker
    with its one message, a kind named without its arguments fails as the item's error."""
    from pipelines.gpu_check import cli, items

    assert items.checked_items() == tuple(CHECKS) == cli.ITEMS
    # a check not composed of several processes (report.Check.composed) runs one of its own name
    assert {name for name, check in CHECKS.items() if check.composed is None} == {
        kind for kind, item in items.REGISTRY.items() if kind == item.part_of}
    assert {kind for kind, item in items.REGISTRY.items() if item.part_of == "overhead"} == {
        "overhead-time", "overhead-memory"}
    common = ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out.json"), "--device", "cpu"]
    with pytest.raises(SystemExit) as stopped:
        items.main(["warp", *common])
    assert stopped.value.code == "unknown item 'warp'"
    assert items.main(["overhead-memory:peft", *common]) == 1
    assert json.loads((tmp_path / "out.json").read_text()) == {
        "error": "ValueError: item 'overhead-memory' is named overhead-memory:<engine>:<arm>:<shape>"}


def test_the_timed_steps_count_each_arm_s_garbage_collections():
    """Python's garbage collections inside each arm's timed steps are counted (the warm-up's are
    not): a step that keeps many objects alive sets off more of them, and the full ones walk the
    whole process, a host cost no operation count sees. Automatic collection is off here, so only
    the steps' own collections run."""
    import gc

    from pipelines.gpu_check.report import collections_note

    def lora(_batch: int) -> None:
        pass

    def grit(batch: int) -> None:
        gc.collect(generation=2 if batch == 4 else 0)

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        timed = interleaved_step_times(lora, grit, range(5), warmup=2)
    finally:
        if was_enabled:
            gc.enable()
    assert timed.collections["lora"].generations == [0, 0, 0] and timed.collections["lora"].seconds == 0.0
    assert timed.collections["grit"].generations == [2, 0, 1] and timed.collections["grit"].seconds > 0
    figures = {arm: tally.figures(timed.steps) for arm, tally in timed.collections.items()}
    assert figures["grit"]["per_step"] == [2 / 3, 0.0, 1 / 3] and figures["grit"]["full"] == 1
    note = collections_note(figures)
    assert note.startswith(", garbage collection GRIT ") and note.endswith("ms/step (1 full) vs LoRA 0 (0 full)")
    assert collections_note(None) == collections_note({"lora": figures["lora"]}) == ""


@pytest.mark.slow
def test_a_cpu_rehearsal_runs_the_real_items(tmp_path: Path):
    """The hybrid through the real Unsloth engine (CPU fallback: no fused kernels there) with GRIT's
    callback and the probe, the hybrid truncating its factors, and the bf16 item: all pass; QLoRA
    is reported as not run."""
    out = tmp_path / "report.json"
    done = _check("--device", "cpu", "--items", "hybrid,truncation,qlora,bf16", "--out", str(out))
    payload = json.loads(out.read_text())
    items = {i["name"]: i for i in payload["items"]}
    assert items["hybrid"]["passed"], items["hybrid"]
    assert items["hybrid"]["figures"]["modules_covered_step1"] == items["hybrid"]["figures"]["modules"] == 14
    # every module hands GRIT its rows through GRIT's fused LoRA functions, none through hooks
    assert items["hybrid"]["figures"]["capture_paths"] == {"fused": 14}
    assert items["hybrid"]["figures"]["missing_internals"] == []
    # the hybrid declines Unsloth's per-layer torch.compile, which would skip hooks GRIT registers later
    assert items["hybrid"]["figures"]["block_compile"] == "0"
    truncation = items["truncation"]["figures"]
    assert items["truncation"]["passed"], items["truncation"]
    assert truncation["modules_truncated"] > 0 and truncation["min_rank"] < truncation["built_rank"]
    assert truncation["reload_shapes_equal"] and truncation["reload_max_logit_difference"] < 1e-5   # fp32 on CPU
    assert items["bf16"]["passed"] and items["bf16"]["figures"]["statistics_dtypes"] == ["torch.float32"]
    assert items["qlora"]["passed"] is None
    assert done.returncode == EXIT_FAILED                      # a rehearsal with an item not run is no pass
    assert "cpu rehearsal: not a GPU check" in done.stdout


def test_the_flop_estimate_agrees_with_torchs_flop_counter():
    """LoRA's share of the FLOP bound rests on ``lora_step_flops``: on a small Llama with LoRA on
    every projection it is within a few percent of what torch's FlopCounterMode counts in a real
    forward and backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.gpu_check.items import lora_step_flops
    from profiling.lora_llama import random_lora_llama

    shape = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    model = random_lora_llama(3, 128, 384, 4, 2, 96, r=16)
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert 0.97 < lora_step_flops(shape, 96, 2, 64, 16) / counter.get_total_flops() < 1.06


@pytest.mark.slow
def test_a_cpu_rehearsal_of_the_overhead_item_reports_every_figure(tmp_path: Path):
    """The overhead item's plumbing on CPU at the SmolLM2 shape, a few tokens: per engine the step
    and memory ratios, LoRA's tokens/s, and the GRIT steps' host reads (0: nothing in GRIT's
    before_step and after_step reads a tensor on the host)."""
    out = tmp_path / "report.json"
    _check("--device", "cpu", "--items", "overhead", "--shapes", "smollm2", "--steps", "1", "--batch", "1",
           "--length", "16", "--out", str(out))
    figures = json.loads(out.read_text())["items"][0]["figures"]["engines"]
    assert sorted(figures) == ["peft@smollm2", "unsloth@smollm2"]
    for engine in figures.values():
        assert engine["step_time_ratio"] > 0 and engine["peak_memory_ratio"] > 0 and engine["lora_tokens_per_s"] > 0
        assert engine["grit_host_syncs"] == 0 and engine["grit_steps_watched"] == 1
        assert engine["lora_flop_fraction"] is None        # no FLOP bound is claimed for a CPU
    # Unsloth's GRIT arm runs without its per-layer compile: LoRA is timed without it too
    unsloth = figures["unsloth@smollm2"]
    assert unsloth["compile_off_ratio"] > 0 and unsloth["lora_uncompiled_step_ms"] > 0
    assert unsloth["grit_over_uncompiled_lora"] == \
        pytest.approx(unsloth["grit_step_ms"] / unsloth["lora_uncompiled_step_ms"])
    assert "compile_off_ratio" not in figures["peft@smollm2"]
    unknown = _check("--device", "cpu", "--items", "overhead", "--shapes", "smollm2,llama-70b")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: --shapes")
    dtype = _check("--device", "cpu", "--items", "overhead", "--adapter-dtype", "fp8")
    assert dtype.returncode == 2 and "--adapter-dtype: invalid choice: 'fp8'" in dtype.stderr
