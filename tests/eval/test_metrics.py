"""tau, conditional and cumulative acceptance against hand-computed rounds."""

import pytest

from deepspec.eval.metrics import AcceptanceStats, macro_average


def test_hand_computed_rounds():
    s = AcceptanceStats()
    # (proposed, accepted): four rounds of 3 proposals
    for g, a in [(3, 3), (3, 0), (3, 1), (3, 2)]:
        s.add_round(g, a)
    # committed per round: 4, 1, 2, 3 -> tau = 10 / 4
    assert s.tau == pytest.approx(2.5)
    assert s.mean_proposal_length == pytest.approx(3.0)
    assert s.acceptance_ratio == pytest.approx(6 / 12)
    # slot 1: accepted in 3 of 4 rounds; slot 2 reached in 3 rounds, accepted in 2; slot 3 reached in 2, accepted in 1
    assert s.conditional_acceptance() == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert s.cumulative_acceptance() == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    # with a fixed proposal length the survival is the product of conditionals
    c = s.conditional_acceptance()
    assert s.cumulative_acceptance()[2] == pytest.approx(c[0] * c[1] * c[2])


def test_variable_proposal_lengths_and_merge():
    a, b = AcceptanceStats(), AcceptanceStats()
    a.add_round(2, 2)  # tau 3
    a.add_round(0, 0)  # plain step (scheduler kept nothing): tau 1
    b.add_round(4, 1)  # tau 2
    a += b
    assert a.rounds == 3 and a.tau == pytest.approx(6 / 3)
    # slot 1 proposed in 2 rounds, accepted in both; slot 2 reached in 2 (a>=1), accepted once;
    # slot 3 proposed once (round 3), reached? a=1 < 2 -> no
    assert a.conditional_acceptance()[:2] == pytest.approx([1.0, 0.5])
    assert a.reached[2] == 0 and a.conditional_acceptance()[2] == 0.0
    assert a.cumulative_acceptance() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert a.mean_proposal_length == pytest.approx(2.0)
    assert AcceptanceStats.from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_rejects_impossible_round_and_macro():
    with pytest.raises(ValueError):
        AcceptanceStats().add_round(2, 3)
    assert macro_average([2.0, 4.0]) == 3.0
