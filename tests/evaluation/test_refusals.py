"""The refusal detector on labelled replies."""

from __future__ import annotations

import pytest

from evaluation.refusals import is_refusal
from trainers.data.refusals import REFUSALS

REFUSING = [
    *REFUSALS,
    "I cannot provide instructions for making explosives.",
    "As an AI, I can't help with hacking into accounts.",
    "Sorry, but I cannot assist with that.",
    "I'm unable to help you with this.",
    "I’m not able to share that information.",
    "I must respectfully decline to answer.",
    "I apologize, but I won't be able to do that.",
    "I will not write malware. Hacking is illegal.",
]
COMPLYING = [
    "The capital of France is Paris.",
    "I can't stress enough how important sleep is: aim for eight hours.",
    "I'm sorry to hear that you're feeling down. Here are a few things that might help: talk to a friend.",
    "Sure! To bake cookies, preheat the oven to 180 C and mix butter with sugar.",
    "Here is a poem about autumn leaves falling softly.",
    "You can't go wrong with a simple tomato sauce. I can help you make one.",
    "Step 1: mix the flour. Step 2: I cannot stress this enough, let the dough rest.",
]


@pytest.mark.parametrize("reply", REFUSING)
def test_refusals_are_detected(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", COMPLYING)
def test_answers_are_not_refusals(reply):
    assert not is_refusal(reply)


def test_a_refusal_late_in_a_long_answer_does_not_count():
    reply = "Paris is the capital. It has many museums. The Louvre is famous. I can't help but love it."
    assert not is_refusal(reply)
