"""Label rules of the training and evaluation sets: which prompts count as harmful requests,
which benign answers are kept, how lmdoctor's unpaired facts become pairs."""

from __future__ import annotations

from trainers.data.assemble import answer_examples, harmful_requests, interleave_by_source, pair_statements
from trainers.data.config import HARMFUL_REQUEST_AREAS, DataParams
from trainers.data.sources import FactPair, Prompt


def _prompt(identifier: str, source: str, group: str | None = None) -> Prompt:
    return Prompt(id=identifier, source=source, text=f"text of {identifier}", group=group)


def test_chatbot_persona_and_misinformation_items_are_not_trained_as_harmful_requests():
    prompts = [_prompt("hb/1", "harmbench"),
               _prompt("dna/1", "donotanswer", "malicious_uses"),
               _prompt("dna/2", "donotanswer", "human_chatbox"),
               _prompt("dna/3", "donotanswer", "misinformation_harms"),
               _prompt("dna/4", "donotanswer", "information_hazard")]
    kept = harmful_requests(prompts, DataParams().donotanswer_areas)
    assert [p.id for p in kept] == ["hb/1", "dna/1", "dna/4"]
    assert "human_chatbox" not in HARMFUL_REQUEST_AREAS and "misinformation_harms" not in HARMFUL_REQUEST_AREAS


def test_the_shipped_donotanswer_files_are_the_areas_the_config_names():
    from trainers.data.sources import donotanswer_prompts

    groups = {p.group for p in donotanswer_prompts()}
    assert set(HARMFUL_REQUEST_AREAS) < groups and {"human_chatbox", "misinformation_harms"} < groups


def test_a_benign_prompt_without_a_finished_answer_is_left_out():
    rows = answer_examples([_prompt("h", "harmbench")], [_prompt("a", "chatterbot"), _prompt("b", "chatterbot")],
                           lambda prompts: ["A whole answer.", None], seed=0)
    assert [(r["id"], r["kind"]) for r in rows] == [("h", "harmful"), ("a", "benign")]


def test_unpaired_statements_become_minimal_pairs_one_to_one():
    facts = [FactPair("lm/1", "lmdoctor_facts", "The Pacific Ocean is the largest ocean in the world.", None),
             FactPair("lm/2", "lmdoctor_facts", None, "The Pacific Ocean is the smallest ocean in the world."),
             FactPair("lm/3", "lmdoctor_facts", "Fire needs oxygen to burn.", None),
             FactPair("lm/4", "lmdoctor_facts", None, "The largest tree in the world is a cactus."),
             FactPair("lm/5", "lmdoctor_facts", "The Nile is the longest river.", None),
             FactPair("lm/6", "lmdoctor_facts", None, "The Nile is the longest river.")]
    pairs = pair_statements(facts, min_similarity=0.75)
    assert [(p.true, p.false) for p in pairs] == [("The Pacific Ocean is the largest ocean in the world.",
                                                   "The Pacific Ocean is the smallest ocean in the world.")]


def test_the_shipped_lmdoctor_facts_give_well_over_a_hundred_pairs():
    from trainers.data.sources import lmdoctor_fact_statements

    pairs = pair_statements(lmdoctor_fact_statements())
    assert len(pairs) > 100
    assert all(p.true and p.false and p.true != p.false for p in pairs)
    assert len({p.true for p in pairs}) == len(pairs) == len({p.false for p in pairs})


def test_evaluation_rows_alternate_their_sources():
    rows = [{"source": "a", "id": 1}, {"source": "a", "id": 2}, {"source": "a", "id": 3}, {"source": "b", "id": 4}]
    assert [r["id"] for r in interleave_by_source(rows)] == [1, 4, 2, 3]
