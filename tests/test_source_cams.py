"""CAMs from another method (cams.source): the npz format, its checks and how maps are fitted."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.source_cams import SourceCamError, fit_source_cams, read_source_cams


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_maps_are_resized_relued_and_normalised_per_class_in_tag_order():
    rng = np.random.default_rng(0)
    cams = rng.normal(0.3, 0.5, size=(2, 5, 7)).astype(np.float16)  # any resolution, some negative
    data = _npz(cams=cams, class_ids=np.array([3, 1]))
    read, ids = read_source_cams(data)
    low, high = fit_source_cams(read, ids, [1, 3], num_classes=4, image_size=(30, 41))
    assert low.shape == (2, 8, 11) and high.shape == (2, 30, 41)
    # Reference from the definition: class 1 is the second map of the file.
    for out, size in ((low, (8, 11)), (high, (30, 41))):
        for k, source in ((0, 1), (1, 0)):
            up = F.interpolate(torch.from_numpy(cams[source].astype(np.float32))[None, None], size=size,
                               mode="bilinear", align_corners=False)[0, 0].clamp(min=0).numpy()
            np.testing.assert_allclose(out[k], up / (up.max() + 1e-5), rtol=1e-5, atol=1e-6)
    assert 0.99 < low.max() < 1.0 and low.min() >= 0


def test_an_image_without_tags_has_no_maps():
    low, high = fit_source_cams(np.zeros((0, 3, 3), np.float32), np.zeros(0, np.int64), [], 4, (9, 10))
    assert low.shape == (0, 3, 3) and high.shape == (0, 9, 10)


@pytest.mark.parametrize("data, words", [
    (b"not an npz at all", "not a readable npz"),
    (_npz(cams=np.zeros((1, 4, 4), np.float32)), "lacks class_ids"),
    (_npz(class_ids=np.array([1])), "lacks cams"),
    (_npz(cams=np.array([{"x": 1}], dtype=object), class_ids=np.array([1])), "not a readable npz"),  # no pickles
    (_npz(cams=np.zeros((4, 4), np.float32), class_ids=np.array([1])), "float [K, h, w]"),
    (_npz(cams=np.zeros((1, 4, 4), np.int32), class_ids=np.array([1])), "float [K, h, w]"),
    (_npz(cams=np.zeros((2, 4, 4), np.float32), class_ids=np.array([1])), "int [K] with K = 2"),
    (_npz(cams=np.full((1, 4, 4), np.nan, np.float32), class_ids=np.array([1])), "NaN"),
], ids=["garbage", "no-ids", "no-cams", "object-array", "2d", "int-cams", "k-mismatch", "nan"])
def test_unusable_files_are_refused_with_a_reason(data, words):
    with pytest.raises(SourceCamError, match=re.escape(words)):
        read_source_cams(data)


@pytest.mark.parametrize("ids, tags, words", [
    ([5], [1], "not in 1..4"),
    ([1, 1], [1], "repeat"),
    ([1, 2], [1], "disagree with the manifest's tags"),
    ([2], [3], "disagree"),
])
def test_classes_must_be_the_images_tags(ids, tags, words):
    cams = np.ones((len(ids), 4, 4), np.float32)
    with pytest.raises(SourceCamError, match=words):
        fit_source_cams(cams, np.array(ids), tags, 4, (16, 16))
