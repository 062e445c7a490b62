"""The KL-estimator table's claims, checked exactly on an enumerable policy (benchmark/kl_estimators.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark"))
from kl_estimators import Args, expected_gradients  # noqa: E402


def _errors(length, seed):
    rows = expected_gradients(Args(length=length, seed=seed))
    exact, kl = rows.pop("exact KL")
    return {name: ((g - exact).norm() / exact.norm()).item() for name, (g, _) in rows.items()}, rows, kl


@pytest.mark.parametrize("seed", [0, 1])
def test_which_estimators_are_unbiased(seed):
    tokens, _, _ = _errors(1, seed)  # one token: the textbook case
    assert tokens["k1 in the reward"] < 1e-5 and tokens["k2 in the loss"] < 1e-5
    assert min(tokens["k1 in the loss"], tokens["k3 in the loss"], tokens["k2 in the reward"],
               tokens["k3 in the reward"]) > 0.1
    sequences, rows, kl = _errors(3, seed)  # sequences of 3 tokens
    assert sequences["k1 in the reward"] < 1e-5  # only k1 in the reward stays unbiased for sequences
    assert min(v for k, v in sequences.items() if k != "k1 in the reward") > 0.01
    assert rows["k1 in the loss"][0].norm() < 1e-6  # E[grad log pi] = 0: k1 in the loss gives no gradient at all
    assert rows["k1 in the reward"][1] == pytest.approx(kl, rel=1e-5)  # E[k1] = E[k3] = KL, E[k2] != KL
    assert rows["k3 in the loss"][1] == pytest.approx(kl, rel=1e-5)
