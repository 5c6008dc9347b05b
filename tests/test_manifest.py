import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.data.manifest import is_safe_id, load_manifest, validate_records
from pipeline.data.voc import voc_manifest_rows, write_voc_manifest
from pipeline.io import codecs

GOOD = [
    {"image_id": "a", "uri": "img/a.jpg", "labels": ["cat"]},
    {"image_id": "b", "uri": "/abs/b.jpg", "labels": ["dog", "cat"]},
    {"image_id": "c", "uri": "s3://bkt/c.jpg", "labels": []},
]


def _write_all_formats(tmp_path, records):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    lines = ["image_id,uri,labels"] + [
        f"{r['image_id']},{r['uri']},{';'.join(r['labels'])}" for r in records]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    codecs.write_parquet(str(tmp_path / "m.parquet"), pa.Table.from_pylist(records))
    return [str(tmp_path / f"m.{ext}") for ext in ("parquet", "csv", "jsonl")]


def test_all_formats_read_the_same_rows_and_resolve_relative_uris(tmp_path):
    results = []
    for uri in _write_all_formats(tmp_path, GOOD):
        rows, quarantine, classes = load_manifest(uri)
        assert quarantine == []
        results.append([(r.image_id, r.uri, r.labels) for r in rows])
        assert classes == ["cat", "dog"]  # sorted union of labels
    assert results[0] == results[1] == results[2]
    assert results[0][0] == ("a", str(tmp_path / "img" / "a.jpg"), ["cat"])
    assert results[0][1][1] == "/abs/b.jpg" and results[0][2][1] == "s3://bkt/c.jpg"


def test_csv_labels_accept_json_lists(tmp_path):
    (tmp_path / "m.csv").write_text('image_id,uri,labels\nx,x.png,"[""cat"", ""dog""]"\ny,y.png,\n')
    rows, quarantine, _ = load_manifest(str(tmp_path / "m.csv"))
    assert [r.labels for r in rows] == [["cat", "dog"], []] and quarantine == []


def test_every_bad_row_kind_is_quarantined_with_a_reason():
    records = GOOD + [
        {"image_id": "a", "uri": "again.jpg", "labels": ["cat"]},          # duplicate id
        {"image_id": "../etc/passwd", "uri": "x.jpg", "labels": ["cat"]},  # unsafe id
        {"image_id": "sp ace", "uri": "x.jpg", "labels": ["cat"]},         # unsafe id
        {"image_id": "u", "uri": "u.jpg", "labels": ["unicorn"]},          # unknown class
        {"image_id": "m", "uri": "", "labels": ["cat"]},                   # missing uri
        {"image_id": "n", "labels": ["cat"]},                              # missing uri
        {"uri": "noid.jpg", "labels": ["cat"]},                            # missing id
        {"image_id": 7, "uri": "int.jpg", "labels": ["cat"]},              # id not a string
        {"image_id": "l", "uri": "l.jpg", "labels": 5},                    # labels malformed
        {"_error": "line 12 is not valid JSON"},                           # malformed row
    ]
    rows, quarantine, classes = validate_records(records, "/base", classes=["cat", "dog"])
    assert [r.image_id for r in rows] == ["a", "b", "c"] and classes == ["cat", "dog"]
    reasons = {q.image_id: q.reason for q in quarantine}
    assert len(quarantine) == 10 and all(q.stage == "manifest" and q.reason for q in quarantine)
    assert "duplicate image_id" in reasons["a"]
    assert "unsafe characters" in reasons["../etc/passwd"] and "unsafe characters" in reasons["sp ace"]
    assert "unknown class" in reasons["u"] and "unicorn" in reasons["u"]
    assert "missing uri" in reasons["m"] and "missing uri" in reasons["n"]
    assert "missing image_id" in reasons[""] or any("missing image_id" in q.reason for q in quarantine)
    assert "must be a string" in reasons["7"]
    assert "labels must be a list" in reasons["l"]
    assert any("malformed manifest row" in q.reason for q in quarantine)


def test_malformed_jsonl_line_does_not_fail_the_set(tmp_path):
    # A byte-order mark (as some editors write) opens the file; it is not part of row 1.
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf{"image_id": "a", "uri": "a.png", "labels": ["cat"]}\n{oops\n[1]\n'
                                       b'{"image_id": "b\xff"}\n')
    rows, quarantine, _ = load_manifest(str(tmp_path / "m.jsonl"))
    assert [r.image_id for r in rows] == ["a"]
    expected = ["line 2 is not valid JSON", "line 3 is not a JSON object", "line 4 is not valid UTF-8"]
    assert len(quarantine) == 3 and all(words in q.reason for words, q in zip(expected, quarantine))


def test_csv_with_bad_bytes_quarantines_only_that_row(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"image_id,uri,labels\na,a.png,cat\nb\xff,b.png,cat\nc,c.png,ca\xfft\n")
    rows, quarantine, _ = load_manifest(str(tmp_path / "m.csv"), ["cat"])
    assert [r.image_id for r in rows] == ["a"]
    assert [("unsafe" in q.reason, "unknown class" in q.reason) for q in quarantine] == [(True, False), (False, True)]


@pytest.mark.parametrize("image_id, ok", [("2007_000032", True), ("a.b-c_d", True), ("..", False),
                                          (".tmp-x", False), (".hidden", False), ("a/b", False),
                                          ("a\\b", False), ("", False), ("é", False), ("x" * 201, False),
                                          ("a\n", False), ("a\nb", False)])
def test_safe_ids(image_id, ok):
    assert is_safe_id(image_id) is ok


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P")
    image.save(path)


def test_voc_adapter_on_a_fake_devkit(tmp_path):
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n2007_000002\n")
    (voc / "Annotations").mkdir()
    for image_id, names in (("2007_000001", ["cat", "dog", "cat"]), ("2007_000002", ["person"])):
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        _png(voc / "JPEGImages" / f"{image_id}.png", np.zeros((8, 8, 3), np.uint8))
    semantic = np.zeros((8, 8), np.uint8)
    semantic[:4, :4], semantic[4:, 4:], semantic[0, :] = 8, 12, 255  # cat, dog, boundary
    objects = np.zeros((8, 8), np.uint8)
    objects[:4, :4], objects[4:, 4:], objects[0, :] = 1, 2, 255
    (voc / "SegmentationClass").mkdir()
    (voc / "SegmentationObject").mkdir()
    (voc / "SegmentationClass" / "2007_000001.png").write_bytes(codecs.encode_semantic_png(semantic))
    (voc / "SegmentationObject" / "2007_000001.png").write_bytes(codecs.encode_semantic_png(objects))

    rows = voc_manifest_rows(str(voc), "train")
    assert [r.image_id for r in rows] == ["2007_000001", "2007_000002"]
    assert rows[0].labels == ["cat", "dog"] and rows[1].labels == ["person"]
    assert rows[0].uri.endswith("JPEGImages/2007_000001.jpg")
    assert rows[0].gt_semantic_uri.endswith("SegmentationClass/2007_000001.png")
    assert rows[0].gt_instance_classes == ["cat", "dog"]
    assert rows[1].gt_semantic_uri == "" and rows[1].gt_instance_uri == ""

    out = write_voc_manifest(str(voc), str(tmp_path / "voc.parquet"), "train")
    from pipeline.data.voc import VOC_CLASSES

    valid, quarantine, classes = load_manifest(out, list(VOC_CLASSES))
    assert len(valid) == 2 and quarantine == [] and classes[7] == "cat"

    # The paper's setting: train on train_aug (a list file of the official code), evaluate on
    # train only, hold val out (no ground truth) for the quality gate.
    (tmp_path / "train_aug.txt").write_text("2007_000002\n2007_000001\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000002\n")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n")
    out = write_voc_manifest(str(voc), str(tmp_path / "paper.parquet"), str(tmp_path / "train_aug.txt"),
                             ground_truth_set="train", held_out_set="val")
    rows = codecs.read_parquet(out).to_pylist()
    assert [(r["image_id"], r["split"]) for r in rows] == [("2007_000002", "train"), ("2007_000001", "train"),
                                                           ("2007_000002", "val")]
    assert rows[1]["gt_semantic_uri"] == ""  # has PNGs but is not in the evaluated set
    assert rows[2]["gt_semantic_uri"] == "" and rows[2]["labels"] == ["person"]
    with pytest.raises(FileNotFoundError, match="train_aug"):
        write_voc_manifest(str(voc), str(tmp_path / "x.parquet"), "train_aug")
