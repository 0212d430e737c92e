"""The GPU check's items, their pass/fail rules and its report (no torch, no CUDA).

Each item is declared once, in :data:`CHECKS`: its title, the rule that judges its figures, the
figures the table shows, whether it needs CUDA, how its processes run. Each item's worker
returns its figures as a plain dict; :func:`judge` turns them into an :class:`ItemResult` with
the failures spelled out, :func:`report` and :func:`table` render them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.gpu_check.processes import overhead, profile, run_item
from profiling.phases import largest_first

EXIT_PASSED, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 3

# GRIT over plain LoRA, same engine, same batches: the targets the project states.
STEP_TIME_TARGET = 1.05
PEAK_MEMORY_TARGET = 1.02
# bf16 model, fp32 statistics and inverses vs an fp32 recomputation on the same batch: bf16
# activations carry ~3 significant digits, so per-module preconditioned gradients agree to
# about 1e-2, not to fp32 rounding.
BF16_MIN_COSINE = 0.99
BF16_MAX_RELATIVE_DIFFERENCE = 0.1
# QLoRA: an adapter reloaded onto a freshly quantised base must compute what it did.
RELOAD_MAX_LOGIT_DIFFERENCE = 1e-2


@dataclass
class ItemResult:
    """``passed`` None: not run (``notes`` say why), never counted as a pass."""

    name: str
    passed: bool | None
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return CHECKS[self.name].title if self.name in CHECKS else self.name


def _probe_failures(figures: dict[str, Any]) -> list[str]:
    """GRIT must have captured rows on every LoRA module in step 1 and be judged effective."""
    failures = []
    modules, covered = figures.get("modules", 0), figures.get("modules_covered_step1", 0)
    if not modules or covered < modules:
        failures.append(f"GRIT captured rows on {covered}/{modules} LoRA modules in step 1")
    if figures.get("verdict") != "effective":
        failures.append(f"probe verdict {figures.get('verdict')!r} "
                        f"({', '.join(figures.get('reasons') or []) or 'no reason'})")
    return failures


def _reload_logit_failures(figures: dict[str, Any]) -> list[str]:
    """A saved adapter reloaded onto a fresh base must compute what it did."""
    difference = figures.get("reload_max_logit_difference")
    if difference is None or not difference <= RELOAD_MAX_LOGIT_DIFFERENCE:
        return [f"the reloaded adapter computes other logits (max |difference| {difference}, "
                f"allowed {RELOAD_MAX_LOGIT_DIFFERENCE})"]
    return []


def judge_hybrid(figures: dict[str, Any]) -> list[str]:
    failures = [f"Unsloth internals the project relies on are gone: {', '.join(figures['missing_internals'])}"] \
        if figures.get("missing_internals") else []
    if figures.get("device") == "cuda" and not figures.get("fused_kernels", {}).get("total"):
        failures.append("Unsloth installed no fused LoRA kernel on CUDA (the path under test did not run)")
    return failures + _probe_failures(figures)


def judge_truncation(figures: dict[str, Any]) -> list[str]:
    failures = []
    if not figures.get("modules_truncated"):
        failures.append("GRIT truncated no module (the path under test did not run)")
    elif not figures.get("steps_after_truncation"):
        failures.append("no training step ran after the truncation")
    if not figures.get("losses_finite"):
        failures.append("a training loss is missing or not finite")
    if not figures.get("reload_shapes_equal"):
        failures.append("the reloaded adapter's LoRA shapes differ from the truncated ones")
    failures += _reload_logit_failures(figures)
    return failures


def judge_qlora(figures: dict[str, Any]) -> list[str]:
    failures = _probe_failures(figures)
    if not figures.get("nf4_layers"):
        failures.append("no bitsandbytes Linear4bit layer in the model: it was not loaded in NF4")
    failures += _reload_logit_failures(figures)
    if not figures.get("reload_weights_equal"):
        failures.append("the reloaded LoRA weights differ from the trained ones")
    return failures


def judge_bf16(figures: dict[str, Any]) -> list[str]:
    failures = []
    if figures.get("statistics_dtypes") != ["torch.float32"]:
        failures.append(f"GRIT statistics or inverses are not fp32: {figures.get('statistics_dtypes')}")
    if not figures.get("all_finite"):
        failures.append("a preconditioned gradient is not finite")
    cosine, difference = figures.get("min_cosine"), figures.get("max_relative_difference")
    if cosine is None or not cosine >= BF16_MIN_COSINE:
        failures.append(f"preconditioned gradients vs fp32: min cosine {cosine} < {BF16_MIN_COSINE}")
    if difference is None or not difference <= BF16_MAX_RELATIVE_DIFFERENCE:
        failures.append(f"preconditioned gradients vs fp32: max relative difference {difference} > "
                        f"{BF16_MAX_RELATIVE_DIFFERENCE}")
    return failures


def judge_overhead(figures: dict[str, Any]) -> list[str]:
    failures = []
    for engine, ratios in sorted(figures.get("engines", {}).items()):
        # the mean over the timed steps counts GRIT's inversions (one in update_freq), as a run
        # pays them; reports from before it was recorded hold only the median
        mean = ratios.get("mean_step_time_ratio")
        time_ratio, memory_ratio = mean or ratios.get("step_time_ratio"), ratios.get("peak_memory_ratio")
        for what, ratio, target in (("mean step time" if mean else "step time", time_ratio, STEP_TIME_TARGET),
                                    ("peak memory", memory_ratio, PEAK_MEMORY_TARGET)):
            if ratio is None or not math.isfinite(ratio):
                failures.append(f"{engine}: {what} GRIT/LoRA not measured")
            elif ratio > target:
                failures.append(f"{engine}: {what} GRIT/LoRA {_fmt(ratio)} > {target}")
        syncs = ratios.get("grit_host_syncs")
        if syncs:          # None: a report from before the count; 0: the target
            failures.append(f"{engine}: {syncs} host synchronisations in {ratios.get('grit_steps_watched')} GRIT steps "
                            "(target 0)")
    if not figures.get("engines"):
        failures.append("no engine was measured")
    return failures


def judge_profile(figures: dict[str, Any]) -> list[str]:
    """A diagnosis, not a target: it fails only when an arm's phases were not all measured."""
    failures = []
    for engine, arms in sorted(figures.get("engines", {}).items()):
        for arm in ("lora", "grit"):
            profiled = arms.get(arm, {})
            if not profiled.get("host_ms"):
                failures.append(f"{engine}: {arm} arm not profiled")
            elif profiled.get("device_ms") == 0 or profiled.get("kernel_launches") == 0:
                # a GPU step runs kernels: none seen means the profile's device events were misread
                failures.append(f"{engine}: {arm} arm's kernels not found in the profile")
    return failures or ([] if figures.get("engines") else ["no engine was profiled"])


def judge(name: str, figures: dict[str, Any] | None, error: str | None = None,
          not_run: str | None = None) -> ItemResult:
    """The verdict of one item from what its worker returned (or the error that ended it)."""
    if not_run is not None:
        return ItemResult(name, None, notes=[not_run])
    if error is not None or figures is None:
        return ItemResult(name, False, figures or {}, [f"the check itself failed: {error or 'no result'}"])
    failures = CHECKS[name].judge(figures)
    return ItemResult(name, not failures, figures, failures, list(figures.get("notes", [])))


def exit_code(items: list[ItemResult]) -> int:
    return EXIT_PASSED if items and all(i.passed for i in items) else EXIT_FAILED


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def headline(item: ItemResult) -> str:
    """The few figures that say what happened, for the table (its item's :attr:`Check.headline`)."""
    return CHECKS[item.name].headline(item.figures) if item.name in CHECKS else ""


def headline_probe(f: dict[str, Any]) -> str:
    """GRIT's coverage in step 1 and the probe's verdict: the qlora item's headline, the hybrid's after its kernels."""
    return (f"rows on {f.get('modules_covered_step1', 0)}/{f.get('modules', 0)} modules in step 1; "
            f"verdict {f.get('verdict', 'n/a')}; update cosine vs control {_fmt(f.get('update_cosine_median'))}")


def headline_hybrid(f: dict[str, Any]) -> str:
    kernels = f.get("fused_kernels", {})
    return (f"fused kernels {kernels.get('qkv', 0)} QKV / {kernels.get('o', 0)} O / {kernels.get('mlp', 0)} MLP; "
            + headline_probe(f))


def headline_truncation(f: dict[str, Any]) -> str:
    return (f"{f.get('modules_truncated', 0)}/{f.get('modules', 0)} modules truncated at step "
            f"{f.get('truncated_at_step')} (ranks {f.get('min_rank')}-{f.get('max_rank')} "
            f"of {f.get('built_rank')}), "
            f"{f.get('steps_after_truncation', 0)} steps after; reload logits within "
            f"{_fmt(f.get('reload_max_logit_difference'))}")


def headline_bf16(f: dict[str, Any]) -> str:
    return (f"min cosine {_fmt(f.get('min_cosine'))}, max relative difference "
            f"{_fmt(f.get('max_relative_difference'))} over {f.get('modules', 0)} modules")


def headline_overhead(f: dict[str, Any]) -> str:
    return "; ".join(f"{engine}: time x{_fmt(r.get('step_time_ratio'))}"
                     + (f" (mean x{_fmt(r['mean_step_time_ratio'])})" if r.get("mean_step_time_ratio") else "")
                     + f", memory x{_fmt(r.get('peak_memory_ratio'))}"
                     + (f", LoRA {_fmt(r['lora_tokens_per_s'])} tokens/s" if r.get("lora_tokens_per_s") else "")
                     + (f" ({_fmt(100 * r['lora_flop_fraction'])}% of the FLOP bound)"
                        if r.get("lora_flop_fraction") else "")
                     + (f" (leaving Unsloth's compile x{_fmt(r['compile_off_ratio'])}, GRIT over uncompiled "
                        f"LoRA x{_fmt(r.get('grit_over_uncompiled_lora'))})" if r.get("compile_off_ratio") else "")
                     + (", base in NF4" if r.get("base") == "nf4" else "")
                     + (", adapters in the model's dtype" if r.get("adapter_dtype") == "model" else "")
                     + (f", GRIT capture {r['grit_capture']}" if r.get("grit_capture", "auto") != "auto" else "")
                     + (", LoRA through GRIT's fused functions" if r.get("lora_functions") == "fused" else "")
                     + collections_note(r.get("garbage_collections"))
                     for engine, r in sorted(f.get("engines", {}).items())) or "n/a"


def headline_profile(f: dict[str, Any]) -> str:
    return "; ".join(f"{engine}: {profile_line(r)}" for engine, r in sorted(f.get("engines", {}).items())) or "n/a"


def profile_line(figures: dict[str, Any]) -> str:
    """GRIT minus LoRA per step: host milliseconds by phase (the larger ones), operator calls
    (where the profile counted them), device and launches."""
    extra = figures.get("grit_minus_lora", {})
    phases = largest_first(extra.get("host_ms", {}), 3)
    line = f"host {_signed(extra.get('host_ms_total'))} ms (" + ", ".join(f"{n} {_signed(v)}" for n, v in phases) + ")"
    if extra.get("host_ops"):
        operators = largest_first(extra["host_ops"], 2)
        line += (f", operator calls {_signed(sum(extra['host_ops'].values()))} ("
                 + ", ".join(f"{n} {_signed(v)}" for n, v in operators) + ")")
    if extra.get("device_ms") is not None:
        line += f", device kernels {_signed(extra['device_ms'])} ms"
    if extra.get("kernel_launches") is not None:
        line += f", launches {_signed(extra['kernel_launches'])}"
    # ranked here: the report's JSON is written with sorted keys, which orders kernels by name
    kernels = largest_first(extra.get("kernels_ms") or {}, 2)
    if kernels:
        line += " (most: " + ", ".join(f"{name[:40]} {_signed(ms)}" for name, ms in kernels) + ")"
    return line + " per step" + collections_note({arm: figures[arm].get("garbage_collections")
                                                  for arm in ("lora", "grit") if isinstance(figures.get(arm), dict)})


def collections_note(collections: dict[str, Any] | None) -> str:
    """Python's garbage collection in each arm's measured steps, where it was counted: its
    milliseconds per step and the full collections (each walks every object of the process)."""
    if not collections or not all(collections.get(arm) for arm in ("lora", "grit")):
        return ""
    lora, grit = collections["lora"], collections["grit"]
    return (f", garbage collection GRIT {_fmt(grit['ms_per_step'])} ms/step ({grit['full']} full) vs LoRA "
            f"{_fmt(lora['ms_per_step'])} ({lora['full']} full)")


def _signed(value: Any) -> str:
    return f"{value:+.3g}" if isinstance(value, (int, float)) else "n/a"


Figures = dict[str, Any]
Outcome = tuple[Figures | None, str | None]


@dataclass(frozen=True)
class Check:
    """One item of the check, declared once: its ``title`` in the table, the rule that ``judge``s
    its figures (the failures; none when it passes), the ``headline`` of figures the table shows
    when it passes, why it is not run off CUDA (``cuda_only``; None: a CPU rehearsal runs it too),
    and, for an item ``composed`` of several worker processes, the function that runs them
    (``processes.py``; None: one process of the item's own name, ``items.py``)."""

    name: str
    title: str
    judge: Callable[[Figures], list[str]]
    headline: Callable[[Figures], str]
    cuda_only: str | None = None
    composed: Callable[[Path, str, list[str], int, tuple[str, ...]], Outcome] | None = None

    def run(self, workdir: Path, device: str, sizes: list[str], timeout_s: int, shapes: tuple[str, ...]) -> Outcome:
        """(figures, None), or (None, the error that ended one of the item's processes)."""
        if self.composed is not None:
            return self.composed(workdir, device, sizes, timeout_s, shapes)
        return run_item(self.name, workdir, device, sizes, timeout_s)


CHECKS: dict[str, Check] = {check.name: check for check in (
    Check("hybrid", "Unsloth fused kernels + GRIT callback (hybrid)", judge_hybrid, headline_hybrid),
    Check("truncation", "hybrid with GRIT's rank truncation, adapter reload", judge_truncation, headline_truncation),
    Check("qlora", "NF4 base (bitsandbytes) + LoRA + GRIT", judge_qlora, headline_probe,
          cuda_only="bitsandbytes NF4 needs CUDA"),
    Check("bf16", "bf16 model, fp32 GRIT statistics", judge_bf16, headline_bf16),
    Check("overhead", "GRIT overhead over LoRA", judge_overhead, headline_overhead, composed=overhead),
    Check("profile", "where GRIT's extra step time goes (profiler)", judge_profile, headline_profile,
          composed=profile),
)}


def table(items: list[ItemResult]) -> str:
    status = {True: "PASS", False: "FAIL", None: "not run"}
    lines = ["| check | result | figures |", "|---|---|---|"]
    for item in items:
        if item.failures or item.passed is None:
            detail = "; ".join(item.failures or item.notes)
        else:
            detail = headline(item) or "; ".join(item.notes)
        lines.append(f"| {item.title} | {status[item.passed]} | {detail} |")
    return "\n".join(lines)


def report(items: list[ItemResult], environment: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: environment, every item with its figures and failures, the targets."""
    return {
        "passed": exit_code(items) == EXIT_PASSED,
        "environment": environment,
        "targets": {"step_time_ratio": STEP_TIME_TARGET, "peak_memory_ratio": PEAK_MEMORY_TARGET,
                    "bf16_min_cosine": BF16_MIN_COSINE, "bf16_max_relative_difference": BF16_MAX_RELATIVE_DIFFERENCE,
                    "reload_max_logit_difference": RELOAD_MAX_LOGIT_DIFFERENCE},
        "items": [asdict(item) | {"title": item.title} for item in items],
    }


def item_from_report(entry: dict[str, Any]) -> ItemResult:
    """An item as a JSON report holds it (:func:`report`'s ``items``)."""
    return ItemResult(entry["name"], entry["passed"], entry.get("figures", {}), entry.get("failures", []),
                      entry.get("notes", []))


def docs_block(reports: dict[str, dict[str, Any]]) -> str:
    """docs/gpu.md's table of a committed run of the check: file name -> its JSON report."""
    environments = {json.dumps(r["environment"], sort_keys=True) for r in reports.values()}
    environment = next(iter(reports.values()))["environment"]
    packages = ", ".join(f"{name} {version}" for name, version in sorted(environment.get("packages", {}).items()))
    same = "" if len(environments) == 1 else " (the reports' environments differ: see each file)"
    items = [item_from_report(entry) for r in reports.values() for entry in r["items"]]
    return (f"{environment.get('gpu', 'n/a')}, torch {environment.get('torch')}, CUDA {environment.get('cuda')}, "
            f"Python {environment.get('python')}; {packages}{same}. Rendered from "
            + ", ".join(f"`{name}`" for name in reports) + ":\n\n" + table(items))

