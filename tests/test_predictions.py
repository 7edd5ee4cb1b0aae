"""ternet.predictions: softmax and top-k."""
import json

import numpy as np
import pytest

from ternet.predictions import Prediction, softmax, top_k


def test_softmax_sums_to_one_and_survives_large_logits():
    p = softmax(np.array([1000.0, 1000.0, -1000.0], np.float32))
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(softmax(np.zeros((2, 4))).sum(axis=-1), 1.0)


def test_top_k_order_labels_probabilities():
    preds = top_k(np.array([0.1, 3.0, 2.0, -1.0], np.float32), ["a", "b", "c", "d"], 3)
    assert [p.index for p in preds] == [1, 2, 0]
    assert [p.rank for p in preds] == [1, 2, 3]
    assert [p.label for p in preds] == ["b", "c", "a"]
    assert preds[0].probability == pytest.approx(softmax([0.1, 3.0, 2.0, -1.0])[1])


def test_ties_go_to_lower_index():
    preds = top_k(np.array([1.0, 5.0, 5.0, 5.0, 0.0]), list("abcde"), 4)
    assert [p.index for p in preds] == [1, 2, 3, 0]


def test_k_larger_than_classes_and_missing_labels():
    preds = top_k(np.array([0.0, 1.0]), ["only"], 10)
    assert len(preds) == 2 and preds[0].label == "class_1" and preds[1].label == "only"


@pytest.mark.parametrize("row,k", [(np.array([]), 1), (np.zeros((2, 2)), 1),
                                   (np.array([1.0, np.nan]), 1), (np.array([1.0]), 0)])
def test_bad_input(row, k):
    with pytest.raises(ValueError):
        top_k(row, [], k)


def test_prediction_is_frozen_and_serialisable():
    p = Prediction(rank=1, index=281, label="tabby", probability=0.5)
    with pytest.raises(Exception):
        p.rank = 2
    assert json.loads(json.dumps(p.as_dict())) == {"rank": 1, "index": 281, "label": "tabby",
                                                   "probability": 0.5}
