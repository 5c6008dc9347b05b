"""Labels versions and shard upkeep: copies keep only listed images; out-of-date rows are dropped."""

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


def test_drop_rows_rewrites_only_the_shards_that_hold_them(tmp_path):
    from pipeline.stages.common import drop_rows, read_class_ids

    directory = str(tmp_path / "cams")
    for ids in (["a", "b"], ["c"], ["d"]):
        codecs.write_parquet(storage.join(directory, layout.part_name(ids)),
                             pa.table({"image_id": ids, "class_ids": [[1, 2]] * len(ids)}))
    untouched = storage.join(directory, layout.part_name(["d"]))
    before = (tmp_path / "cams" / untouched.rsplit("/", 1)[-1]).stat().st_mtime_ns
    assert drop_rows(directory, {"b", "c", "zzz"}) == 2
    assert read_class_ids(directory) == {"a": (1, 2), "d": (1, 2)}
    assert len(storage.list_files(directory)) == 2  # the shard left empty is removed
    assert (tmp_path / "cams" / untouched.rsplit("/", 1)[-1]).stat().st_mtime_ns == before
    assert drop_rows(directory, set()) == 0


def test_class_ids_of_shards_without_them_are_unknown(tmp_path):
    from pipeline.stages.common import read_class_ids

    codecs.write_parquet(str(tmp_path / "old.parquet"), pa.table({"image_id": ["a"], "uri": ["x.png"]}))
    assert read_class_ids(str(tmp_path)) == {"a": None}


def test_cam_pending_redoes_retagged_images_and_retries_moved_failures(tmp_path):
    from pipeline.stages.cams import pending
    from pipeline.stages.common import quarantined_ids, read_class_ids, write_quarantine

    root = str(tmp_path)
    codecs.write_parquet(storage.join(layout.cams_dir(root), layout.part_name(["a", "e"])),
                         pa.table({"image_id": ["a", "e"], "uri": ["a.png", "e.png"], "class_ids": [[1], [2]]}))
    write_quarantine(root, "cams", [{"image_id": "b", "uri": "old/b.png", "reason": "image file not found"},
                                    {"image_id": "f", "uri": "f.png", "reason": "empty file (0 bytes)"}])
    # A high-res shard whose CAM shard was never written (its writer died in between).
    codecs.write_parquet(storage.join(layout.high_res_cams_dir(root), layout.part_name(["c"])),
                         pa.table({"image_id": ["c"]}))
    source = pa.table({"image_id": ["a", "b", "c", "d", "e", "f"],
                       "uri": ["a.png", "new/b.png", "c.png", "d.png", "e.png", "f.png"],
                       "class_ids": pa.array([[1], [1], [1], [1], [2, 3], [1]], pa.list_(pa.int32()))})
    todo = pending(root, source)
    # a: done; b: its file was moved, retried; c, d: never done; e: retagged, redone; f: still broken.
    assert todo.column("image_id").to_pylist() == ["b", "c", "d", "e"]
    assert read_class_ids(layout.cams_dir(root)) == {"a": (1,)}
    assert quarantined_ids(root, "cams") == {"f"}
    assert storage.list_files(layout.high_res_cams_dir(root)) == []



def test_labels_without_recorded_tags_or_cams_are_out_of_date(tmp_path):
    from pipeline.stages.synthesis import current_labels

    labels = str(tmp_path / "v1")
    codecs.write_parquet(storage.join(labels, "images", "old.parquet"),
                         pa.table({"image_id": ["x", "y"], "uri": ["x.png", "y.png"]}))  # before class_ids
    codecs.write_parquet(storage.join(labels, "images", "new.parquet"),
                         pa.table({"image_id": ["z", "w"], "class_ids": [[1], [2]]}))
    current, stale = current_labels({"y": (1,), "z": (1,), "w": (3,)}, labels)
    assert current == {"z"} and stale == {"x", "y", "w"}
