"""``evaluation.agreement``: two engines' replies compared on constructed lists."""

import pytest

from evaluation.agreement import reply_agreement, shared_prefix


def test_identical_replies_agree_in_every_reading():
    replies = ["I can't help with that.", "Paris is the capital of France.", "Sure, here is a recipe."]
    agreement = reply_agreement(replies, list(replies))
    assert (agreement.same_opening, agreement.same_reply, agreement.same_verdict, agreement.verdict_kappa) == (
        1.0, 1.0, 1.0, 1.0)
    assert agreement.shared_words == 5.0


def test_replies_parting_late_share_their_opening_and_verdict_but_not_the_whole():
    first = ["I can't help with that request at all.", "Paris is the capital of France."]
    second = ["I can't help with that, sorry.", "Paris is the capital and largest city."]
    agreement = reply_agreement(first, second)
    assert agreement.same_opening == 1.0 and agreement.same_reply == 0.0
    assert agreement.same_verdict == 1.0            # a decline and a compliance both times
    assert agreement.shared_words == 4.0            # median of 4 and 4


def test_a_different_verdict_counts_against_agreement():
    first = ["I can't help with that.", "Here is how you do it: first, ...", "Sure, here it is."]
    second = ["Here is how you do it: first, ...", "Here is how you do it: first, ...", "Sure, here it is."]
    agreement = reply_agreement(first, second)
    assert agreement.same_verdict == pytest.approx(2 / 3) and agreement.same_opening == pytest.approx(2 / 3)


def test_unequal_or_empty_lists_are_refused():
    with pytest.raises(ValueError, match="equal, non-empty"):
        reply_agreement(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        reply_agreement([], [])


def test_shared_prefix_counts_leading_equal_items():
    assert shared_prefix("a b c".split(), "a b d".split()) == 2 and shared_prefix([], ["a"]) == 0
