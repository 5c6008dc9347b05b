"""The class vocabulary: 1-based ids in label PNGs and COCO, 0-based multi-hot for the CAM network."""

import numpy as np
import pytest

from pipeline.data.classes import Vocabulary


def test_ids_multi_hot_and_categories_agree():
    vocabulary = Vocabulary(["cat", "dog", "bird"])
    assert [vocabulary.id(n) for n in ("cat", "dog", "bird")] == [1, 2, 3]
    assert vocabulary.ids(["bird", "cat"]) == [1, 3] and vocabulary.name(3) == "bird"
    assert vocabulary.get("fish") is None
    with pytest.raises(KeyError):
        vocabulary.id("fish")
    hot = vocabulary.multi_hot([["dog"], ["bird", "cat"], []])
    assert hot.dtype == np.float32
    assert hot.tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    # position i of the multi-hot is class id i + 1
    assert [vocabulary.name(i + 1) for i in np.flatnonzero(hot[1])] == ["cat", "bird"]
    assert vocabulary.categories()[1] == {"id": 2, "name": "dog", "supercategory": "object"}
