"""The smoke profile of ``dvc repro`` runs every stage end to end in a temporary copy of the repo."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys

import pytest
import yaml
from pipeline_copy import _digests, _sh, repo_copy
from sqlalchemy import func, select

from db.models import Comparison, EvalMetric, ServedFigure, SpeedMetric, StudyTrial, TrainMetric, TuningJournal
from db.store import open_store
from evaluation.config import tuning_seeds
from pipelines.params import load_params
from pipelines.stage import pipeline_stage_names

pytestmark = pytest.mark.slow     # whole DVC pipelines of the smoke profile


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    # Two seed replicates: every stage handles them, and compare_all aggregates over seeds.
    return repo_copy(tmp_path_factory, ["smoke", "train.n_seeds=2"])


def test_smoke_dvc_repro_runs_every_stage_and_completes_the_run(smoke_repo):
    repo, env = smoke_repo
    repro = _sh(["dvc", "repro"], repo, env, timeout=2400).stdout      # nine variants, two seeds each

    params = load_params(repo / "params.yaml")
    declared = pipeline_stage_names(repo, params)
    assert {"prepare_model", "prepare_data", "train@baseline_lora", "train@hybrid_grit", "train@pure_grit",
            "train@peft_lora", "train@peft_dora", "train@riemannian_lora", "train@loraplus", "probe",
            "export@pure_grit", "export@hybrid_grit", "export@peft_dora", "export@riemannian_lora", "export@loraplus",
            "serve", "evaluate", "compare"} <= set(declared)
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(declared) <= set(locked), f"stages that did not run: {set(declared) - set(locked)}"

    store = open_store("sqlite:///outputs/centralized.db", repo)
    (run,) = store.runs()
    assert run.profile == "smoke" and run.status == "complete"
    stages = store.stages(run.id)
    assert {name: s.status for name, s in stages.items()} == {name: "succeeded" for name in declared}

    # Fairness: all variants trained on the same batches (per seed); both GRIT variants ended fully
    # ready. The smoke profile trains two seed replicates of every variant.
    seeds = params.train.seeds
    assert len(seeds) == 2
    metrics = {v: json.loads((repo / "metrics/train" / f"{v}.json").read_text()) for v in params.variants}
    for seed in seeds:
        hashes = {m["seeds"][str(seed)]["batch_order_hash"] for m in metrics.values()}
        assert len(hashes) == 1, seed
    assert metrics["pure_grit"]["seeds"][str(seeds[0])]["batch_order_hash"] != \
        metrics["pure_grit"]["seeds"][str(seeds[1])]["batch_order_hash"]         # another seed, another order
    assert metrics["hybrid_grit"]["grit_all_ready"] and metrics["pure_grit"]["grit_all_ready"]
    with store.reader() as session:
        for variant in params.variants:
            for seed in seeds:
                steps = session.scalars(select(TrainMetric.step).where(
                    TrainMetric.run_id == run.id, TrainMetric.variant == variant, TrainMetric.seed == seed)
                    .order_by(TrainMetric.step)).all()
                assert steps == list(range(1, params.train.max_steps + 1)), (variant, seed)
    assert (repo / "artifacts/adapters/pure_grit/adapter_model.safetensors").is_file()
    assert (repo / f"artifacts/adapters/pure_grit/seed-{seeds[1]}/adapter_model.safetensors").is_file()

    # Validation loss every train.eval_steps steps and after the last, in the store per step.
    with store.reader() as session:
        validated = session.scalars(select(TrainMetric.step).where(
            TrainMetric.run_id == run.id, TrainMetric.variant == "pure_grit", TrainMetric.seed == seeds[0],
            TrainMetric.val_loss.is_not(None)).order_by(TrainMetric.step)).all()
    assert validated == [2, 4]
    # grit_paper (the paper configuration) really truncated its adapter to rank 2 of 4; it was
    # reloaded, exported (parity below) and evaluated (compare_all below) like every variant.
    paper, lora = (json.loads((repo / f"artifacts/adapters/{v}/grit_metadata.json").read_text())
                   for v in ("grit_paper", "peft_lora"))
    assert set(paper["effective_ranks"].values()) == {2} and set(lora["effective_ranks"].values()) == {4}
    assert paper["trainable_parameters"] * 2 == lora["trainable_parameters"]

    # The probe ran every GRIT variant against its same-engine control: GRIT changed the updates.
    # GRIT's peers (params only: a lora_optimizer of PEFT's, declared by the default profile) trained
    # with that optimizer, and each one's step differs from plain LoRA's; the Riemannian one's beyond
    # its scalar twin, LoRA+'s (a step size per factor by design) has none.
    probes = json.loads((repo / "metrics/probes.json").read_text())["variants"]
    peers = {"riemannian_lora": "riemannian", "loraplus": "loraplus"}
    assert set(probes) == {"hybrid_grit", "pure_grit", "grit_paper", *peers}
    for name, probe in probes.items():
        assert probe["verdict"] == "effective", (name, probe["checks"])
        assert probe["update_cosine_median"] < 0.99 and probe["preconditioner"] == peers.get(name, "grit")
        assert name in peers or probe["loss_max_abs_difference"] > 0
    assert "turned by >= 0.2 from its scalar twin" in probes["riemannian_lora"]["checks"]["beyond_scalar"]
    assert probes["loraplus"]["checks"]["beyond_scalar"].startswith("LoRA+ is a step size per factor")
    for name, kind in peers.items():
        trained = json.loads((repo / f"artifacts/adapters/{name}/grit_metadata.json").read_text())
        assert trained["lora_optimizer"] == kind and trained["steps"] == params.train.max_steps, name
    assert lora["lora_optimizer"] is None
    assert (repo / "plots/probe_update_divergence.png").is_file()

    # peft_dora (DoRA, declared in the smoke profile's params only) trained like every variant, but
    # has no GGUF form: export@peft_dora and serve each skip it in one line saying why, and its
    # export folder holds only that reason.
    served = [v for v in params.variants if v != "peft_dora"]
    why = "DoRA adapters cannot be served: llama.cpp's LoRA converter takes lora_A/lora_B tensors only"
    skips = [line for line in repro.splitlines() if "peft_dora" in line and "skipped" in line]
    assert len(skips) == 2 and skips[0].startswith(f"[export@peft_dora] skipped: {why}") and \
        skips[1].startswith(f"[serve] peft_dora: skipped: {why}"), skips
    assert [p.name for p in (repo / "artifacts/export/peft_dora").iterdir()] == ["skipped.json"]
    assert (repo / f"artifacts/adapters/peft_dora/seed-{seeds[1]}/adapter_model.safetensors").is_file()

    # Every replicate exported with proven parity; served by llama.cpp (no Ollama server in the test).
    for variant in served:
        for folder in (f"artifacts/export/{variant}", f"artifacts/export/{variant}/seed-{seeds[1]}"):
            export = json.loads((repo / folder / "export.json").read_text())
            assert export["parity"]["adapter"]["agreement"] >= params.export.min_agreement, folder
    manifest = json.loads((repo / "artifacts/serve/manifest.json").read_text())
    assert manifest["backend"] == "llama.cpp"
    assert set(peers) <= set(served)               # plain LoRA adapters: exported, served, evaluated as any
    assert set(manifest["models"]) == {"base", *served, *(f"{v}_seed{seeds[1]}" for v in served)}
    assert set(manifest["not_served"]) == {"peft_dora"} and manifest["not_served"]["peft_dora"].startswith(why)
    assert f"ollama create pure_grit_seed{seeds[1]}_model" in " ".join(manifest["ollama"]["commands"])

    # compare_all prints the store's figures: with two seeds every (model, metric) cell is the mean
    # of the stored per-seed rows with a t-interval across seeds; the base (not trained) has one row.
    from evaluation.compare_all import _number, load_run
    from evaluation.metrics import model_metrics, within_range
    from evaluation.stats import mean_over_seeds

    result = _sh([sys.executable, "-m", "evaluation.compare_all", "--csv", "reports/compare.csv"], repo, env)
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in result.stdout.splitlines() if line.startswith("| ")}
    models = lines["metric"]
    assert models == ["base", *params.variants]
    with store.reader() as session:
        stored: dict[tuple[str, str], list] = {}
        for m in session.scalars(select(EvalMetric).where(EvalMetric.run_id == run.id)):
            stored.setdefault((m.variant, m.metric), []).append(m)
        comparisons = session.scalars(select(Comparison).where(Comparison.run_id == run.id)).all()
    for metric, label, source in ((m.name, m.label, m.source) for m in model_metrics()):
        for model, printed in zip(models, lines[label], strict=True):
            if model not in ("base", *served) and source == "served":   # peft_dora: its fp32 figures only
                assert printed == "n/a" and (model, metric) not in stored, (metric, model, printed)
                continue
            rows = stored[(model, metric)]
            if model == "base":
                (row,) = rows
                expected = f"{_number(row.value)} [{_number(row.ci_low)}, {_number(row.ci_high)}]"
            else:
                assert sorted(r.seed for r in rows) == seeds, (metric, model)
                i = within_range(metric, mean_over_seeds([r.value for r in rows]))
                expected = f"{_number(i.value)} [{_number(i.low)}, {_number(i.high)}]"
            assert printed.startswith(expected), (metric, model, printed, expected)
    assert {(c.variant, c.reference, c.seed) for c in comparisons} >= {
        (g, c, s) for g, c in (("hybrid_grit", "baseline_lora"), ("pure_grit", "peft_lora")) for s in seeds}
    grit_table = result.stdout.split("## GRIT vs its same-engine control")[1]
    assert "paired t over 2 seeds" in grit_table and "GRIT" in grit_table and "Holm" in grit_table
    # Holm over each seed's family, speed side by side against the base, parity beside the figures,
    # and the success criteria judged from them.
    assert all(c.p_adjusted is not None and c.p_adjusted >= c.p_value for c in comparisons)
    with store.reader() as session:
        ratios = session.scalars(select(SpeedMetric).where(SpeedMetric.run_id == run.id,
                                                           SpeedMetric.metric == "delta_speed_decode")).all()
    assert {(r.variant, r.seed) for r in ratios} == {(v, s) for v in served for s in seeds}
    assert all(r.value > 0 and r.n == params.eval.speed_prompts * params.eval.speed_rounds for r in ratios)
    form = params.serve.weights
    # The second serving backend: every served replicate through a private Ollama server of the
    # real build in each form its export wrote (the base once), judged, paired with llama.cpp's
    # replies and timed by Ollama's counters; DoRA, not served, has none. compare_all shows them
    # beside llama.cpp's and names the form `ollama run` serves.
    with store.reader() as session:
        through = session.scalars(select(ServedFigure).where(ServedFigure.run_id == run.id)).all()
    forms = {}
    for f in through:
        forms.setdefault((f.variant, f.seed), set()).add(f.form)
    assert forms.pop(("base", params.train.seed)) == {"base"}
    assert set(forms) == {(v, s) for v in served for s in seeds}
    assert forms[("pure_grit", seeds[0])] == {"adapter", "merged"} and all("adapter" in f for f in forms.values())
    refusals = [f for f in through if f.metric == "refusal_rate"]
    assert all(f.backend == "ollama" and f.n == params.eval.refusal_prompts and f.ci_low <= f.value for f in refusals)
    assert all(f.value > 0 for f in through if f.metric == "ollama_decode_tokens_per_second")
    replies = (repo / "artifacts/eval/ollama_generations.jsonl").read_text().splitlines()
    assert len(replies) == sum(len(f) for f in forms.values()) * (params.eval.refusal_prompts +
                                                                 params.eval.overrefusal_prompts) + \
        params.eval.refusal_prompts + params.eval.overrefusal_prompts
    ollama_table = result.stdout.split("## Served through Ollama beside llama.cpp")[1].split("\n## ")[0]
    assert f"| pure_grit | {form} (`ollama run`) |" in ollama_table and "| pure_grit | adapter |" in ollama_table
    # Every query docs/store.md shows runs on the store as written and finds rows.
    queries = re.findall(r'```bash\nsqlite3 [^\n]*\n\s*"(.*?)"\n```', (repo / "docs/store.md").read_text(), re.S)
    assert len(queries) >= 4
    with contextlib.closing(sqlite3.connect(repo / "outputs/centralized.db")) as db:
        for query in queries:
            assert db.execute(query).fetchall(), query
    # parity is stored once, by the export stage, per form and seed; compare_all judges the served form
    form = params.serve.weights
    assert len(stored[("pure_grit", f"export_parity_{form}_agreement")]) == 2
    assert not any(metric in ("export_parity_agreement", "export_parity_mean_kl") for _, metric in stored)
    criteria = result.stdout.split("## Success criteria")[1].split("##")[0]
    assert "decode speed >= 0.9x base" in criteria and ("pass (" in criteria or "FAIL (" in criteria)
    eval_summary = json.loads((repo / "metrics/eval.json").read_text())
    assert eval_summary["across_seeds"]["n_seeds"] == 2
    assert eval_summary["served_speed_device"] == "cpu"      # the portable llama.cpp build offloads nothing
    # metrics/eval.json and compare_all aggregate the same store over seeds the same way: the same
    # differences, the same Holm-adjusted p-values, the same verdicts.
    written = {(c["variant"], c["reference"], c["metric"]): c for c in eval_summary["across_seeds"]["comparisons"]}
    printed = {(d.variant, d.reference, d.metric): d for d in load_run(params.store.url, repo, run.id).differences}
    assert set(written) == set(printed) and len(written) > 10
    for key, d in printed.items():
        assert written[key]["significant"] == d.significant, key
        assert written[key]["p_adjusted"] == pytest.approx(d.p_adjusted, nan_ok=True), key
    assert (repo / "reports/compare.md").read_text().startswith(f"# Comparison of run {run.id}")   # stage compare
    assert (repo / "reports/compare.md").is_file() and (repo / "reports/compare.csv").is_file()
    assert (repo / "reports/compare_aqi.png").is_file()

    # The study: Optuna asked every method for the same number of configurations (in the store's
    # journal), the finalists re-ran on more seeds, each method's setting is the finalist with the
    # lowest mean validation loss, the test seeds never met a selection seed, no test figure was
    # measured while selecting, and grit_paper truncated with training left after it.
    study, plan = json.loads((repo / "metrics/study.json").read_text()), params.study
    with store.reader() as session:
        trials = session.scalars(select(StudyTrial).where(StudyTrial.run_id == run.id)).all()
        assert session.scalar(select(func.count()).select_from(TuningJournal)) > 0
    by_phase = {phase: [t for t in trials if t.phase == phase] for phase in ("tune", "finalist", "test", "probe")}
    runs_per_method = len(plan.steps)
    studies: dict[str, int] = {}                 # each Optuna study asked for the same number
    for t in by_phase["tune"]:
        name = json.loads(t.metrics_json)["tuning"]
        studies[name] = studies.get(name, 0) + 1
    assert set(studies.values()) == {plan.configurations}
    assert len(plan.methods) * runs_per_method <= len(studies) <= (
        len(plan.methods) * runs_per_method * (1 + plan.edge_extensions))
    widened = len(studies) - len(plan.methods) * runs_per_method    # a best learning rate at an edge
    cells = len(plan.methods) * runs_per_method
    assert 0 < len(by_phase["finalist"]) <= plan.finalists * (plan.finalist_seeds + 1) * cells
    assert len(by_phase["test"]) == len(plan.methods) * plan.seeds * runs_per_method
    selection_seeds = {t.seed for t in by_phase["tune"] + by_phase["finalist"]}
    assert selection_seeds.isdisjoint({t.seed for t in by_phase["test"]})
    for method in plan.methods:
        for steps in plan.steps:
            finalists = {t.setting for t in by_phase["finalist"] if t.method == method and t.steps == steps}
            runs = [t for t in trials if t.setting in finalists and t.method == method and t.steps == steps
                    and (t.phase == "finalist" or (t.phase == "tune" and t.seed == params.train.seed
                                                   and json.loads(t.metrics_json)["stopped_at"] is None))]
            assert {t.seed for t in runs if t.setting == next(iter(finalists))} == set(tuning_seeds(
                params.train.seed, plan.finalist_seeds))            # every finalist ran on every selection seed
            mean = {s: sum(t.val_loss for t in runs if t.setting == s) / sum(t.setting == s for t in runs)
                    for s in finalists}
            assert study["chosen"][f"{method}@{steps}"] == json.loads(min(mean, key=mean.get))
    figures = [json.loads(t.metrics_json)["figures"] for t in by_phase["tune"] + by_phase["finalist"]]
    assert all(set(f) <= {"val_loss", "validation_decline_probability", "trial_seconds"} for f in figures)
    tested = [json.loads(t.metrics_json) for t in by_phase["test"]]
    assert all("test_loss" in m["figures"] and len(m["per_prompt"]["sampled_refusal_rate"]) == plan.refusal_prompts
               for m in tested)
    trained = [t for t in trials if t.phase != "probe"]
    assert all(json.loads(t.metrics_json)["figures"]["trial_seconds"] > t.train_seconds > 0 for t in trained)
    # each preconditioned method probed once per run length, at its chosen setting, training nothing
    probed = [m for m in plan.methods if params.variants[m].grit or params.variants[m].lora_optimizer]
    assert sorted((t.method, t.steps) for t in by_phase["probe"]) == sorted(
        (m, s) for m in probed for s in plan.steps)
    assert all(json.loads(t.setting) == study["chosen"][f"{t.method}@{t.steps}"] and t.train_seconds == 0
               for t in by_phase["probe"])
    assert set(study["probes"]) == {f"{m}@{s}" for m in probed for s in plan.steps}
    capacity = {t.method: t.trainable_parameters for t in by_phase["test"]}
    assert capacity["grit_paper"] * 2 == capacity["peft_lora"]           # truncated from r 4 to k 2, then trained
    study_report = (repo / "reports/study/report.md").read_text()
    assert study["verdict"] in study_report and "Holm" in study_report and "pruner" in study_report
    # each row names its test: the bootstrap's resamples for a per-prompt endpoint, none for the paired t
    per_prompt = set(tested[0]["per_prompt"])
    assert {"retention_accuracy", "test_loss", "separation"} <= per_prompt     # over examples and pairs too
    assert study["tests"] and all((t["bootstrap_resamples"] is None) == (t["metric"] not in per_prompt)
                                  for t in study["tests"])
    # Compute counts each run's wall time (as the sittings do); training is the smaller part of it.
    assert study["compute_total_hours"] > study["training_hours"] > 0 and "of which training" in study_report
    assert study_report.count("the study widened it") == widened == sum("widened" in n for n in study["range_notes"])
    assert all((repo / "reports/study" / f"{name}.png").is_file()
               for name in ("sensitivity", "curves_by_steps", "test_by_steps", "differences_by_steps"))

    # A second repro with nothing changed runs no stage and leaves the store as it was.
    second = _sh(["dvc", "repro"], repo, env)
    assert "didn't change, skipping" in second.stdout or "up to date" in second.stdout
    assert {n: s.finished_at for n, s in store.stages(run.id).items()} == {
        n: s.finished_at for n, s in stages.items()}

    # A params typo under `dvc repro` fails in one line and destroys nothing: DVC would delete the
    # outputs of train@* before the stage validates its params, unless they persist (dvc.yaml).
    finished = _digests(repo, ["artifacts/adapters", "metrics/train", "dvclive/train", "artifacts/base_model.json",
                               "artifacts/export", "metrics/eval.json"])
    good_params = (repo / "params.yaml").read_text()
    bad = yaml.safe_load(good_params)
    bad["train"]["learning_rate"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    typo = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert typo.returncode != 0 and "train.learning_rate: Input should be greater than 0" in typo.stderr
    assert _digests(repo, list(finished)) == finished
    forced = subprocess.run(["dvc", "repro", "-f", "prepare_model"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=600)
    assert forced.returncode != 0 and _digests(repo, list(finished)) == finished
    (repo / "params.yaml").write_text(good_params)

    # An experiment that changes what evaluate computes (recomposed from the smoke profile, with
    # the same two seeds) is a second run: DVC re-runs only evaluate and compare, the run counts
    # every other stage as carried over from the first (same values of its own params), so it is
    # complete without training again; `dvc exp show` and `compare_all --list` both list it, and
    # compare_all reports it by id. (The single-seed path's per-prompt tests are covered by
    # tests/evaluation/test_results.py and test_metric_registry.py.) It measures through llama.cpp
    # alone: the first run measured through Ollama too, and 33 forms again would double its cost.
    _sh(["dvc", "exp", "run", "-n", "more-resamples", "-S", "profile=smoke", "-S", "train.n_seeds=2",
         "-S", "eval.bootstrap_resamples=300", "-S", "eval.ollama_forms=[]"], repo, env, timeout=2400)
    shown = _sh(["dvc", "exp", "show", "--no-pager", "--csv"], repo, env).stdout
    assert "more-resamples" in shown and "300" in shown
    runs = store.runs()
    assert len(runs) == 2 and all(r.status == "complete" for r in runs)
    (experiment,) = [r for r in runs if r.id != run.id]
    assert json.loads(experiment.params_json)["eval"]["bootstrap_resamples"] == 300
    with store.reader() as session:                                        # eval.ollama_forms: []
        assert not session.scalars(select(ServedFigure).where(ServedFigure.run_id == experiment.id)).all()
    assert set(store.stages(experiment.id)) == {"evaluate", "compare"}      # nothing else ran again
    assert {n: s.finished_at for n, s in store.stages(run.id).items()} == {
        n: s.finished_at for n, s in stages.items()}                       # the first run is as it was
    listing = _sh([sys.executable, "-m", "evaluation.compare_all", "--list"], repo, env).stdout
    assert run.id in listing and experiment.id in listing and "eval.bootstrap_resamples=200" in listing
    report = _sh([sys.executable, "-m", "evaluation.compare_all", "--run", experiment.id], repo, env).stdout
    assert report.startswith(f"# Comparison of run {experiment.id}") and "## Success criteria" in report
