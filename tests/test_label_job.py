"""End to end: jobs.label on a tiny synthetic set (tiny backbone, few steps) on local Ray.

One labelled run (session fixture ``labelled``, tests/conftest.py) is inspected by several tests:
every output of DESIGN §3, the quarantine of hostile inputs (broken and oversized files, unsafe and
duplicate ids, malformed rows), re-encoded copies of good images labelled exactly like their
originals, nothing written outside the run root, the COCO export, the stage's labels against a
direct call of the algorithms, the report, a rerun that does no work, and a nightly manifest.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from hostile import BROKEN, CLASSES, CMYK, CONVERTED, GOOD, unsafe_ids
from jobs import label
from pipeline.algorithms import synthesis as algo
from pipeline.data.images import decode_image
from pipeline.data.synthetic import write_synthetic_set
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage
from pipeline.stages.cams import read_cam_rows
from pipeline.train.common import load_exported

pytestmark = pytest.mark.slow


def _valid_ids(run):
    return sorted(GOOD + list(CONVERTED) + list(CMYK))


def _labels_dir(root: str) -> str:
    return layout.labels_dir(root, storage.read_text(layout.latest_pointer(root)).strip())


def _cam_rows(root: str) -> dict[str, dict]:
    return {r["image_id"]: r for uri in storage.list_files(layout.cams_dir(root), ".parquet")
            for r in read_cam_rows(uri)}


def _png_array(uri: str) -> np.ndarray:
    return codecs.decode_label_png(storage.read_bytes(uri))


def test_every_valid_image_has_every_output(labelled):
    root, state = labelled["root"], labelled["state"]
    version = storage.read_text(layout.latest_pointer(root)).strip()
    assert state["last_run"]["labels_version"] == version
    cam_rows = _cam_rows(root)
    assert sorted(cam_rows) == _valid_ids(labelled)
    labels_dir = layout.labels_dir(root, version)
    for image_id, row in cam_rows.items():
        h, w = row["height"], row["width"]
        assert row["cams"].shape == (len(row["class_ids"]), -(-h // 4), -(-w // 4))
        assert _png_array(layout.relation_png(root, image_id)).shape == (h, w)
        semantic = _png_array(layout.semantic_png(labels_dir, image_id))
        instance = _png_array(layout.instance_png(labels_dir, image_id))
        assert semantic.shape == instance.shape == (h, w) and instance.dtype == np.uint16
        assert set(np.unique(semantic)) <= {0, *row["class_ids"]}
    images = pa.concat_tables([codecs.read_parquet(u) for u in storage.list_files(storage.join(labels_dir, "images"))])
    assert sorted(images.column("image_id").to_pylist()) == _valid_ids(labelled)
    for name in ("cam", "irn"):
        assert storage.exists(layout.model_file(root, name)) and load_exported(layout.model_file(root, name))
    assert storage.list_files(storage.join(root, "models", "cam"))  # checkpoint dirs live beside it
    run_json = json.loads(storage.read_text(layout.run_json(root)))
    assert {"config", "versions", "stages", "labels"} <= set(run_json)
    assert all(run_json["stages"][s]["status"] in ("done", "skipped") for s in run_json["stages"])
    assert run_json["versions"]["torch"].startswith("2.14")
    assert state["manifest"]["valid"] == len(_valid_ids(labelled)) + len(BROKEN)
    assert state["manifest"]["quarantined"] == len(labelled["manifest_quarantine"])


def test_hostile_inputs_are_quarantined_with_reasons(labelled):
    rows = pa.concat_tables([codecs.read_parquet(u) for u in
                             storage.list_files(layout.quarantine_dir(labelled["root"]), ".parquet")]).to_pylist()
    expected = [(i, "manifest", words) for i, words in labelled["manifest_quarantine"]]
    expected += [(i, "cams", words) for i, (_, words) in BROKEN.items()]
    for image_id, stage, words in expected:
        matches = [r for r in rows if (r["image_id"], r["stage"]) == (image_id, stage) and words in r["reason"]]
        assert len(matches) == 1, (image_id, stage, words, [r for r in rows if r["image_id"] == image_id])
    assert len(rows) == len(expected)
    # No good image is quarantined: the one row naming a good id is the duplicate, which lost.
    named_good = [r for r in rows if r["image_id"] in _valid_ids(labelled)]
    assert [(r["image_id"], r["stage"]) for r in named_good] == [("syn-000003", "manifest")]
    assert named_good[0]["uri"].endswith("syn-000004.png")
    assert _cam_rows(labelled["root"])["syn-000003"]["uri"].endswith("syn-000003.png")  # the first row won


def test_nothing_is_written_outside_the_run_root(labelled):
    assert labelled["outside_after"] == labelled["outside_before"]
    root = labelled["root"]
    labels_dir = _labels_dir(root)
    for image_id in unsafe_ids(labelled["tmp"]):
        for directory in (os.path.join(root, "relations"), os.path.join(labels_dir, "semantic"),
                          os.path.join(labels_dir, "instance")):
            assert not os.path.exists(os.path.normpath(os.path.join(directory, f"{image_id}.png")))
    named = [os.path.join(d, n) for d, _, names in os.walk(labelled["basetemp"]) for n in names if "escape" in n]
    assert named == []


def test_converted_copies_decode_to_their_originals_pixels(labelled):
    images = os.path.join(labelled["tmp"], "data", "images")

    def read(name):
        return storage.read_bytes(os.path.join(images, name))

    for image_id, (original, name) in CONVERTED.items():
        assert np.array_equal(decode_image(read(name)), decode_image(read(f"{original}.png"))), image_id
    # The copies really are what they claim to be.
    with Image.open(io.BytesIO(read(CONVERTED["exif-syn-000003"][1]))) as exif:
        upright = decode_image(read("syn-000003.png"))
        assert exif.size == upright.shape[:2] and exif.size[0] != exif.size[1]  # stored sideways
        assert exif.getexif()[0x0112] == 6
    with Image.open(io.BytesIO(read(CONVERTED["rgba-syn-000004"][1]))) as rgba:
        assert rgba.mode == "RGBA"
    assert read(CONVERTED["rgb16-syn-000006"][1])[24] == 16  # IHDR bit depth
    with Image.open(io.BytesIO(read(CMYK["cmyk-syn-000007"][1]))) as cmyk:
        assert cmyk.mode == "CMYK"


def test_converted_copies_are_labelled_exactly_like_their_originals(labelled):
    """Same pixels, same labels: EXIF rotation, alpha and 16-bit samples are undone before the model."""
    root = labelled["root"]
    labels_dir, cam_rows = _labels_dir(root), _cam_rows(root)
    for image_id, (original, _) in CONVERTED.items():
        copy, source = cam_rows[image_id], cam_rows[original]
        assert (copy["height"], copy["width"], copy["class_ids"]) == (source["height"], source["width"],
                                                                        source["class_ids"])
        assert np.array_equal(copy["cams"], source["cams"]), image_id
        for uri_of in (lambda i: layout.relation_png(root, i), lambda i: layout.semantic_png(labels_dir, i),
                       lambda i: layout.instance_png(labels_dir, i)):
            assert np.array_equal(_png_array(uri_of(image_id)), _png_array(uri_of(original))), uri_of(image_id)
    for image_id, (original, _) in CMYK.items():
        copy, source = cam_rows[image_id], cam_rows[original]
        assert (copy["height"], copy["width"], copy["class_ids"]) == (source["height"], source["width"],
                                                                        source["class_ids"])
        semantic = _png_array(layout.semantic_png(labels_dir, image_id))
        assert semantic.shape == (source["height"], source["width"])
        assert set(np.unique(semantic)) <= {0, *source["class_ids"]}


def test_coco_loads_and_masks_match_instance_pngs(labelled):
    from pycocotools.coco import COCO

    root = labelled["root"]
    labels_dir = _labels_dir(root)
    coco = COCO(storage.join(labels_dir, "coco.json"))
    assert sorted(img["file_name"] for img in coco.dataset["images"]) == _valid_ids(labelled)
    assert [c["name"] for c in coco.dataset["categories"]] == CLASSES
    for image in coco.dataset["images"]:
        instance = codecs.decode_label_png(storage.read_bytes(layout.instance_png(labels_dir, image["file_name"])))
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])), key=lambda a: a["id"])
        assert len(anns) == len(set(np.unique(instance)) - {0})
        for k, ann in enumerate(anns, start=1):
            assert np.array_equal(coco.annToMask(ann).astype(bool), instance == k)


def test_stage_labels_equal_a_direct_call_of_the_algorithms(labelled):
    from pipeline.models.irnet import build_irnet

    root = labelled["root"]
    labels_dir = _labels_dir(root)
    row = read_cam_rows(storage.list_files(layout.cams_dir(root), ".parquet")[0])[0]
    meta = json.loads(storage.read_text(layout.model_file(root, "irn") + ".json"))
    model = build_irnet(depth=meta["config"]["depth"], state_dict=load_exported(layout.model_file(root, "irn"))).eval()
    image = decode_image(storage.read_bytes(row["uri"]))
    boundary, displacement = model.infer(torch.from_numpy(normalize(image)))
    size = (row["height"], row["width"])
    cams = torch.from_numpy(row["cams"])
    semantic = algo.semantic_labels(cams, row["class_ids"], boundary, size, steps=64)
    masks, classes, scores = algo.instance_labels(cams, row["class_ids"], boundary, displacement, size, steps=64)
    stored = codecs.decode_label_png(storage.read_bytes(layout.semantic_png(labels_dir, row["image_id"])))
    assert np.array_equal(stored, semantic)
    stored_ids = codecs.decode_label_png(storage.read_bytes(layout.instance_png(labels_dir, row["image_id"])))
    assert len(masks) == len(set(np.unique(stored_ids)) - {0})
    for k, mask in enumerate(masks, start=1):
        assert np.array_equal(stored_ids == k, mask)


def test_report_and_metrics(labelled):
    root = labelled["root"]
    html = storage.read_text(storage.join(layout.report_dir(root), "index.html"))
    assert all(name in html for name in CLASSES) and "data:image/png;base64," in html
    assert "train_cam" in html and "https://" not in html
    metrics = json.loads(storage.read_text(storage.join(layout.report_dir(root), "metrics.json")))
    assert set(metrics["ablations"]) == {"cam", "cam_boundary"}
    held_out = metrics["cam_classification"]
    assert held_out["images"] == 2 and 0.0 <= held_out["map"] <= 1.0  # split 'val': every 5th image
    for result in (metrics["irnet"], *metrics["ablations"].values()):
        assert 0.0 <= result["miou"] <= 1.0 and set(result["ap"]) == {"0.5", "0.7"}


def test_rerun_does_no_work_and_grown_manifest_labels_only_new_images(labelled):
    root = labelled["root"]
    state = label.main(labelled["args"])
    assert all(info["status"] == "skipped" for info in state["stages"].values()), state["stages"]
    old_version = storage.read_text(layout.latest_pointer(root)).strip()
    old_files = sorted(os.listdir(os.path.join(layout.labels_dir(root, old_version), "semantic")))

    # The nightly manifest: the same images moved to another directory, two new ones, one image
    # with corrected tags, and the missing file's row now pointing at a real file.
    grown = os.path.join(labelled["tmp"], "grown")
    records = codecs.read_parquet(write_synthetic_set(grown, num_images=12, seed=11, num_classes=4,
                                                      min_size=64, max_size=80)).to_pylist()
    retagged = next(r for r in records if r["image_id"] == "syn-000005")
    retagged["labels"] = ["cross", "square"] if sorted(retagged["labels"]) != ["cross", "square"] else ["disc"]
    records.append({"image_id": "broken-missing", "uri": "images/syn-000001.png", "labels": ["disc"]})
    manifest = os.path.join(grown, "nightly.jsonl")
    storage.write_text(manifest, "".join(json.dumps(r) + "\n" for r in records))
    args = [a if not a.startswith("data.manifest=") else f"data.manifest={manifest}" for a in labelled["args"]]
    state = label.main(args)
    stages = state["stages"]
    assert stages["train_cam"]["status"] == "skipped" and stages["train_irn"]["status"] == "skipped"
    # New images, the retagged one and the fixed reference: nothing else is recomputed.
    assert stages["cams"]["counts"]["done"] == 4 and stages["synthesis"]["counts"]["done"] == 4
    cam_rows = [r for uri in storage.list_files(layout.cams_dir(root), ".parquet") for r in read_cam_rows(uri)]
    assert len(cam_rows) == len({r["image_id"] for r in cam_rows})  # the retagged image has one CAM row
    new_tags = sorted(CLASSES.index(name) + 1 for name in retagged["labels"])
    assert next(r for r in cam_rows if r["image_id"] == "syn-000005")["class_ids"] == new_tags
    quarantined = pa.concat_tables([codecs.read_parquet(u) for u in
                                    storage.list_files(layout.quarantine_dir(root), ".parquet")]).to_pylist()
    assert not [r for r in quarantined if r["image_id"] == "broken-missing" and r["stage"] == "cams"]
    new_version = storage.read_text(layout.latest_pointer(root)).strip()
    assert new_version != old_version
    new_dir = layout.labels_dir(root, new_version)
    # The new version holds exactly the grown manifest's images: the previous version's images that
    # are still listed and unchanged (copied, not relabelled) plus the four relabelled ones; images
    # the manifest no longer lists (the re-encoded copies) are left out of it and of its COCO file.
    grown_ids = ["broken-missing"] + [f"syn-{i:06d}" for i in range(12)]
    assert sorted(os.listdir(os.path.join(new_dir, "semantic"))) == [f"{i}.png" for i in grown_ids]
    assert sorted(os.listdir(os.path.join(new_dir, "instance"))) == [f"{i}.png" for i in grown_ids]
    listed = pa.concat_tables([codecs.read_parquet(u) for u in storage.list_files(storage.join(new_dir, "images"))])
    assert sorted(listed.column("image_id").to_pylist()) == grown_ids
    retagged_row = next(r for r in listed.to_pylist() if r["image_id"] == "syn-000005")
    assert retagged_row["class_ids"] == new_tags
    semantic = codecs.decode_label_png(storage.read_bytes(layout.semantic_png(new_dir, "syn-000005")))
    assert set(np.unique(semantic)) <= {0, *new_tags}
    coco = json.loads(storage.read_text(storage.join(new_dir, "coco.json")))
    assert sorted(image["file_name"] for image in coco["images"]) == grown_ids
    kept = {image["id"] for image in coco["images"]}
    assert all(ann["image_id"] in kept for ann in coco["annotations"])
    # The previous version is immutable: untouched by the nightly rerun.
    assert sorted(os.listdir(os.path.join(layout.labels_dir(root, old_version), "semantic"))) == old_files
    with Image.open(os.path.join(new_dir, "semantic", "syn-000011.png")) as image:
        assert image.mode == "P"
