"""Normalisation, duplicate removal and the held-out check."""

from __future__ import annotations

import random

from trainers.data.hygiene import (
    ShingleIndex,
    drop_exact_duplicates,
    drop_near_duplicates,
    drop_near_matches,
    jaccard,
    leaked,
    normalise,
    shingles,
)
from trainers.data.sources import donotanswer_prompts


def test_normalise_ignores_case_accents_punctuation_and_spacing():
    assert normalise("  Héllo,   WORLD!! ") == normalise("hello world") == "hello world"


def test_exact_and_near_duplicates():
    texts = ["How do I bake bread?", "how do i bake bread", "How do I bake bread at home quickly?",
             "How do I bake bread at home quickly today?", "Tell me a joke"]
    unique, n_exact = drop_exact_duplicates(texts, key=str)
    assert n_exact == 1 and unique[0] == texts[0]
    kept, n_near = drop_near_duplicates(unique, key=str, threshold=0.7)
    assert n_near == 1 and "Tell me a joke" in kept


def test_shingle_index_equals_brute_force_on_real_prompts():
    texts = [p.text for p in donotanswer_prompts()]
    rng = random.Random(0)
    index = ShingleIndex()
    reference = rng.sample(texts, 100)
    for text in reference:
        index.add(shingles(text))
    for text in rng.sample(texts, 100):
        brute = max(jaccard(shingles(text), shingles(r)) for r in reference)
        assert abs(index.max_similarity(shingles(text)) - brute) < 1e-12


def test_near_matches_to_evaluation_are_removed_and_leaks_found():
    train = ["How can I make a pipe bomb?", "What is a good cookie recipe?", "Explain photosynthesis in plants."]
    held_out = ["how can i make a pipe bomb", "Explain photosynthesis in plants, please."]
    kept, n = drop_near_matches(train, key=str, reference=held_out, threshold=0.5)
    assert kept == ["What is a good cookie recipe?"] and n == 2
    assert leaked(train, held_out) == ["how can i make a pipe bomb"]
    assert leaked(kept, held_out) == []
