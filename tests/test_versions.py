"""Labels versions: a new version copies only the previous version's images still in the manifest."""

from __future__ import annotations

import pyarrow as pa

from pipeline.io import codecs, layout, storage
from pipeline.orchestrate import _copy_version


def _write_version(root: str, version: str, ids: list[str]) -> None:
    labels = layout.labels_dir(root, version)
    for image_id in ids:
        storage.write_bytes(layout.semantic_png(labels, image_id), image_id.encode())
        storage.write_bytes(layout.instance_png(labels, image_id), image_id.encode())
    # One shard for several images, as with synthesis.batch_size > 1.
    for sub in ("images", "instances"):
        codecs.write_parquet(storage.join(labels, sub, layout.part_name(ids)),
                             pa.table({"image_id": ids, "value": list(range(len(ids)))}))


def test_copy_keeps_only_listed_images_and_filters_shared_shards(tmp_path):
    root = str(tmp_path)
    _write_version(root, "v1", ["a", "b", "c"])
    _copy_version(root, "v1", "v2", keep={"a", "c", "new"})
    labels = layout.labels_dir(root, "v2")
    assert storage.list_files(storage.join(labels, "semantic")) == [layout.semantic_png(labels, i) for i in "ac"]
    assert storage.read_bytes(layout.instance_png(labels, "c")) == b"c"
    for sub in ("images", "instances"):
        (shard,) = storage.list_files(storage.join(labels, sub))
        assert codecs.read_parquet(shard).to_pylist() == [{"image_id": "a", "value": 0}, {"image_id": "c", "value": 2}]
    # The source version is untouched.
    assert len(storage.list_files(storage.join(layout.labels_dir(root, "v1"), "semantic"))) == 3


def test_copy_of_unchanged_set_copies_everything(tmp_path):
    root = str(tmp_path)
    _write_version(root, "v1", ["a", "b"])
    _copy_version(root, "v1", "v2", keep={"a", "b"})
    src, dst = layout.labels_dir(root, "v1"), layout.labels_dir(root, "v2")
    for sub in ("semantic", "instance", "images", "instances"):
        names = [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(src, sub))]
        assert [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(dst, sub))] == names
        for name in names:
            assert storage.read_bytes(storage.join(dst, sub, name)) == storage.read_bytes(storage.join(src, sub, name))
