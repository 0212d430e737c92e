"""The held-out test sets, capped as a params section says (the evaluate stage and the study read
them the same way): harmful/benign AQI pairs, harmful prompts, edgy-benign prompts, fact pairs."""

from __future__ import annotations

from pathlib import Path

from core.jsonl import read_jsonl


def held_out_sets(data_dir: Path, settings) -> dict[str, list]:
    """The capped evaluation sets of ``data_dir`` (first N of each file, in file order)."""
    rows = read_jsonl(data_dir / "eval_aqi.jsonl")
    by_pair: dict[str, dict[str, str]] = {}
    for row in rows:
        by_pair.setdefault(row["pair_id"], {})[row["label"]] = row["prompt"]
    pairs = [(p["harmful"], p["benign"]) for p in by_pair.values() if "harmful" in p and "benign" in p]
    harmful = [row["prompt"] for row in rows if row["label"] == "harmful"]
    facts = [(r["true"], r["false"]) for r in read_jsonl(data_dir / "eval_facts.jsonl")
             if r["true"] and r["false"]]
    edgy = [row["prompt"] for row in read_jsonl(data_dir / "eval_overrefusal.jsonl")]
    return {"aqi_pairs": pairs[: settings.aqi_pairs], "harmful": harmful[: settings.refusal_prompts],
            "edgy": edgy[: settings.overrefusal_prompts], "facts": facts[: settings.fact_pairs]}
