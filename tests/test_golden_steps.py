"""The states a train step, a distill step and a population step produce are the ones recorded in
tests/golden/steps.json before the code was last restructured (`helpers.golden` says how to
record). On a machine like the recording one every leaf must be the same bit for bit; elsewhere
(another instruction set rounds differently) each leaf's sum within 1e-3 of its absolute sum."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import golden

RECORD = Path(__file__).with_name("golden") / "steps.json"


@pytest.mark.parametrize("case", golden.CASES)
def test_step_state_equals_the_recorded_one(case):
    record = json.loads(RECORD.read_text())
    exact = record["machine"] == golden.machine()
    diff = golden.differences(record["cases"][case], golden.digest(golden.run(case)), exact=exact)
    assert not diff, f"{len(diff)} leaves differ ({'bytes' if exact else 'sums'}), e.g. {diff[:3]}"


def test_the_comparison_sees_one_changed_value():
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": np.arange(5, dtype=np.int32)}}
    want = golden.digest(tree)
    assert golden.differences(want, golden.digest(tree), exact=True) == []
    moved = {**tree, "a": tree["a"].copy()}
    moved["a"][1, 2] = np.nextafter(moved["a"][1, 2], np.float32(np.inf))  # one ulp
    assert [d.split(":")[0] for d in golden.differences(want, golden.digest(moved), exact=True)] == ["['a']"]
    assert golden.differences(want, golden.digest(moved), exact=False) == []  # an ulp is within the tolerance
    moved["a"][0, 0] += 1.0
    assert len(golden.differences(want, golden.digest(moved), exact=False)) == 1
    assert golden.differences(want, golden.digest({"a": tree["a"]}), exact=True) == ["['b']['c']: not in the new state"]
