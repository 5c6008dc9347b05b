import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline.io import codecs, storage


def test_atomic_write_creates_parents_and_leaves_no_temporaries(tmp_path):
    target = str(tmp_path / "a" / "b" / "x.bin")
    storage.write_bytes(target, b"hello")
    storage.write_bytes(target, b"world")  # overwrite is atomic too
    assert storage.read_bytes(target) == b"world"
    assert os.listdir(tmp_path / "a" / "b") == ["x.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = str(tmp_path / "x.txt")
    storage.write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        storage.write_text(target, "new")
    monkeypatch.undo()
    assert storage.read_text(target) == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_list_files_hides_in_flight_temporaries(tmp_path):
    storage.write_bytes(str(tmp_path / "part-1.parquet"), b"1")
    (tmp_path / ".tmp-abc-part-2.parquet").write_bytes(b"partial")
    assert storage.list_files(str(tmp_path), ".parquet") == [str(tmp_path / "part-1.parquet")]
    assert storage.list_files(str(tmp_path / "missing")) == []


def test_leftover_temporaries_of_killed_writers_are_removed(tmp_path):
    storage.write_text(str(tmp_path / "done.txt"), "kept")
    (tmp_path / ".tmp-0123-part.parquet").write_bytes(b"half")  # a writer killed before its rename
    assert storage.remove_temp_files(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == ["done.txt"]
    assert storage.remove_temp_files(str(tmp_path / "missing")) == 0


def test_uri_helpers():
    assert storage.join("s3://bkt/run", "labels", "v1") == "s3://bkt/run/labels/v1"
    assert storage.resolve("img/a.png", "s3://bkt/data") == "s3://bkt/data/img/a.png"
    assert storage.resolve("../img/a.png", "/data/m") == "/data/img/a.png"
    assert storage.resolve("s3://other/a.png", "/data") == "s3://other/a.png"
    assert storage.parent("s3://bkt/data/manifest.parquet") == "s3://bkt/data"
    assert storage.is_local("/tmp/x") and not storage.is_local("memory://x")


def test_non_local_filesystem_round_trip():
    storage.write_bytes("memory://irn-test/dir/obj.bin", b"\x00\x01")
    assert storage.read_bytes("memory://irn-test/dir/obj.bin") == b"\x00\x01"
    listed = storage.list_files("memory://irn-test/dir")
    assert len(listed) == 1 and listed[0].startswith("memory://") and listed[0].endswith("/dir/obj.bin")
    assert storage.read_bytes(listed[0]) == b"\x00\x01"


def test_semantic_png_round_trip_with_voc_palette():
    labels = np.random.default_rng(0).integers(0, 21, size=(13, 17)).astype(np.uint8)
    labels[0, 0] = 255
    data = codecs.encode_semantic_png(labels)
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(data)) as image:
        assert image.mode == "P"
        palette = np.array(image.getpalette()[: 3 * 256]).reshape(-1, 3)
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]
    decoded = codecs.decode_label_png(data)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, labels)


def test_instance_png_is_16_bit_and_exact():
    ids = np.random.default_rng(1).integers(0, 65536, size=(9, 11))
    decoded = codecs.decode_label_png(codecs.encode_instance_png(ids))
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, ids)
    with pytest.raises(ValueError):
        codecs.encode_instance_png(np.full((2, 2), 70000))


def test_float16_arrays_in_parquet_read_back_exactly(tmp_path):
    rng = np.random.default_rng(2)
    arrays = [rng.random((3, 5, 7)).astype(np.float16), rng.random((1, 2, 2)).astype(np.float16),
              np.zeros((0, 4, 4), np.float16)]
    table = pa.table({"image_id": ["a", "b", "c"], **codecs.array_columns("cams", arrays)})
    uri = str(tmp_path / "cams" / "part-0.parquet")
    codecs.write_parquet(uri, table)
    back = codecs.read_parquet(uri)
    assert back.schema.field("cams").type.value_type == pa.float16()
    for i, expected in enumerate(arrays):
        got = codecs.read_array(back, "cams", i)
        assert got.dtype == np.float16 and got.shape == expected.shape and np.array_equal(got, expected)
