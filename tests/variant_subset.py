"""Cut a composed params mapping down to a few variants, with the settings that name variants.

Aliases, the study's methods and the declared comparisons each name variants, and a name that is
not declared is (rightly) a params error; a test that keeps only some variants clears them too.
"""

from __future__ import annotations


def keep_only(raw: dict, variants: dict[str, dict], aliases: dict[str, str] | None = None) -> dict:
    raw["variants"] = variants
    raw["serve"]["aliases"] = aliases or {}
    raw["study"]["methods"] = []          # the smoke study compares variants removed here
    raw["eval"]["comparisons"] = []       # so does the declared pure_grit vs baseline_lora pair
    return raw
