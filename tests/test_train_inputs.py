"""Training inputs decoded once per run: one Ray Data pass decodes, the training side augments
from memory every epoch and never reads the files again; large sets stream."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.data.synthetic import write_synthetic_set
from pipeline.train import inputs
from pipeline.train.cam import CamSamples


def _rows(tmp_path, count: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(write_synthetic_set(str(tmp_path / "data"), num_images=count, seed=3))
    uris = [str(tmp_path / "data" / uri) for uri in table.column("uri").to_pylist()]  # relative to the manifest
    targets = [np.eye(4, dtype=np.float32)[i % 4] for i in range(count)]
    return pa.table({"uri": uris, "target": pa.array([t.tolist() for t in targets], pa.list_(pa.float32()))}), uris


@pytest.mark.parametrize("decode_once", [True, False])
def test_training_inputs_decoded_once_or_streamed(tmp_path, ray_session, decode_once):
    import ray
    import torch

    table, uris = _rows(tmp_path, 6)
    maker = CamSamples(resize_long=[48, 64], crop=40, max_pixels=10**7)
    data = inputs.training_dataset(ray.put(table), maker, decode_once=decode_once, rows_per_block=2)
    if decode_once:
        for uri in uris:  # decoded once: the files are no longer needed
            os.remove(uri)
    epochs = []
    for epoch in range(2):
        batches = list(inputs.augmented_batches(maker, data, 4, seed=epoch, device=torch.device("cpu"),
                                                decoded=decode_once))
        assert [b["image"].shape for b in batches] == [(4, 3, 40, 40), (2, 3, 40, 40)]
        assert sorted(int(t.argmax()) for b in batches for t in b["target"]) == [0, 0, 1, 1, 2, 3]
        epochs.append(torch.cat([b["image"] for b in batches]))
    assert not torch.equal(epochs[0], epochs[1])  # a new augmentation every epoch


def test_decode_once_threshold():
    assert inputs.decodes_once(2000, 2000) and not inputs.decodes_once(2001, 2000)
    assert not inputs.decodes_once(1, 0)
