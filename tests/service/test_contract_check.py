"""The served model's metadata is checked against the contract before a version is served."""

from __future__ import annotations

import copy

import pytest

from service.backends import check_contract

INPUTS = [{"name": "images", "datatype": "UINT8", "shape": [-1, 300, 300, 3]}]
OUTPUTS = [
    {"name": "boxes", "datatype": "FP32", "shape": [-1, 200, 4]},
    {"name": "scores", "datatype": "FP32", "shape": [-1, 200]},
    {"name": "classes", "datatype": "INT32", "shape": [-1, 200]},
]


def test_contract_metadata_gives_k():
    assert check_contract(INPUTS, OUTPUTS) == 200
    # Triton's JSON metadata gives the dimensions as strings
    as_strings = [{**t, "shape": [str(d) for d in t["shape"]]} for t in OUTPUTS]
    assert check_contract(INPUTS, as_strings) == 200


def _changed(tensors, index, **change):
    out = copy.deepcopy(tensors)
    out[index].update(change)
    return out


@pytest.mark.parametrize(
    "inputs, outputs, message",
    [
        (_changed(INPUTS, 0, datatype="FP32"), OUTPUTS, "input 'images'"),
        (_changed(INPUTS, 0, shape=[-1, 3, 300, 300]), OUTPUTS, "input 'images'"),
        (_changed(INPUTS, 0, name="input"), OUTPUTS, "input 'images'"),
        (INPUTS, _changed(OUTPUTS, 1, datatype="FP16"), "output 'scores'"),
        (INPUTS, _changed(OUTPUTS, 2, name="labels"), "output 'classes'"),
        (INPUTS, _changed(OUTPUTS, 0, shape=[-1, 100, 4]), "disagree"),
        (INPUTS, _changed(OUTPUTS, 2, shape=[-1, 100]), "disagree"),
    ],
)
def test_metadata_off_the_contract_is_refused(inputs, outputs, message):
    with pytest.raises(RuntimeError, match=message):
        check_contract(inputs, outputs)
