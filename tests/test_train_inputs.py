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


def test_decoded_once_in_parallel_tasks_keeps_the_table_order(tmp_path, ray_session):
    """The decoding tasks finish in any order; the decoded rows keep the table's, so the workers'
    shards and their seeded shuffles draw the same samples on every run."""
    import ray

    table, _ = _rows(tmp_path, 64)
    maker = CamSamples(resize_long=[48, 64], crop=40, max_pixels=10**7)
    data = inputs.training_dataset(ray.put(table), maker, decode_once=True, rows_per_block=2)
    decoded = [row["image"] for row in data.iter_rows()]
    expected = [maker.decode(row)["image"] for row in table.to_pylist()]
    assert len(decoded) == len(expected) == 64
    assert all(np.array_equal(a, b) for a, b in zip(decoded, expected))


def test_decode_once_threshold():
    assert inputs.decodes_once(2000, 2000) and not inputs.decodes_once(2001, 2000)
    assert not inputs.decodes_once(1, 0)


@pytest.mark.parametrize("decode_once", [True, False])
def test_irnet_inputs_of_a_corrected_image_carry_its_instances_and_exact_targets(tmp_path, ray_session, decode_once):
    """A row with an instance_uri (plan.irn_training_rows: a correction) trains on instance ids in
    place of class ids and on finite displacement targets; a mined row has no target at all."""
    import pyarrow as pa
    import ray
    import torch
    from PIL import Image

    from pipeline.io import codecs
    from pipeline.train.irn import IrnSamples

    image = np.zeros((48, 64, 3), np.uint8)
    semantic = np.zeros((48, 64), np.uint8)
    semantic[8:40, 4:30], semantic[8:40, 30:60] = 1, 1  # two touching instances of one class
    instances = np.zeros((48, 64), np.uint16)
    instances[8:40, 4:30], instances[8:40, 30:60] = 1, 2
    Image.fromarray(image).save(tmp_path / "image.png")
    (tmp_path / "semantic.png").write_bytes(codecs.encode_semantic_png(semantic))
    (tmp_path / "instance.png").write_bytes(codecs.encode_instance_png(instances))
    table = pa.table({"uri": [str(tmp_path / "image.png")] * 2, "relation_uri": [str(tmp_path / "semantic.png")] * 2,
                      "instance_uri": pa.array([str(tmp_path / "instance.png"), None], pa.string())})
    maker = IrnSamples(rescale=[1.0, 1.0], crop=64, max_pixels=10**7)
    data = inputs.training_dataset(ray.put(table), maker, decode_once=decode_once, rows_per_block=2)
    batch = next(iter(inputs.augmented_batches(maker, data, 2, seed=0, device=torch.device("cpu"),
                                               decoded=decode_once)))
    exact = [i for i in range(2) if torch.isfinite(batch["target"][i]).any()]
    assert len(exact) == 1
    corrected, mined = batch["relation"][exact[0]], batch["relation"][1 - exact[0]]
    assert sorted(torch.unique(corrected).tolist()) == [0, 1, 2, 255] and sorted(torch.unique(mined).tolist()) == [0, 1, 255]
    assert torch.isnan(batch["target"][1 - exact[0]]).all()
    target = batch["target"][exact[0]]
    inside = corrected == 2
    assert torch.isfinite(target[:, inside]).all() and (target[:, corrected == 0] == 0).all()
    assert target[:, inside].abs().max() < 16 / 4 + 1  # grid units: the instance is 32 x 30 pixels
