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
import yaml
from hostile import BROKEN, CLASSES, CMYK, CONVERTED, GOOD, unsafe_ids
from PIL import Image

from jobs import label
from pipeline import label_tables, quarantine
from pipeline.algorithms import synthesis as algo
from pipeline.data.images import decode_image
from pipeline.data.synthetic import write_synthetic_set
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage
from pipeline.models.store import load_exported
from pipeline.stages.cams import read_cam_rows

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
    index = label_tables.read_index(labels_dir)
    assert index.column("image_id").to_pylist() == _valid_ids(labelled)  # sorted, one row each
    assert index.column("semantic_uri").to_pylist() == [f"semantic/{i}.png" for i in _valid_ids(labelled)]
    for name in ("cam", "irn"):
        assert storage.exists(layout.model_file(root, name)) and load_exported(layout.model_file(root, name))
    assert storage.list_files(storage.join(root, "models", "cam"))  # checkpoint dirs live beside it
    run_json = json.loads(storage.read_text(layout.run_json(root)))
    assert {"config", "versions", "stages", "labels"} <= set(run_json)
    assert all(run_json["stages"][s]["status"] in ("done", "skipped") for s in run_json["stages"])
    assert run_json["versions"]["torch"].startswith("2.14")
    assert state["manifest"]["valid"] == len(_valid_ids(labelled)) + len(BROKEN)
    assert state["manifest"]["quarantined"] == len(labelled["manifest_quarantine"])
    probe = run_json["stages"]["probe"]["counts"]
    assert probe["decoded"] == len(_valid_ids(labelled)) and probe["unreadable"] == len(BROKEN)
    assert run_json["stages"]["cams"]["counts"]["images"] == len(_valid_ids(labelled))  # the probe's leavings


def test_hostile_inputs_are_quarantined_with_reasons(labelled):
    rows = pa.concat_tables([codecs.read_parquet(u) for u in
                             storage.list_files(layout.quarantine_dir(labelled["root"]), ".parquet")]).to_pylist()
    expected = [(i, "manifest", words) for i, words in labelled["manifest_quarantine"]]
    # Files that do not decode are found by the probe, before anything trains on them.
    expected += [(i, "probe", words) for i, (_, words) in BROKEN.items()]
    for image_id, stage, words in expected:
        matches = [r for r in rows if (r["image_id"], r["stage"]) == (image_id, stage) and words in r["reason"]]
        assert len(matches) == 1, (image_id, stage, words, [r for r in rows if r["image_id"] == image_id])
    assert len(rows) == len(expected)
    # The published version says the same of the images it lacks.
    missing = quarantine.read_quarantine(_labels_dir(labelled["root"])).to_pylist()
    assert sorted((r["image_id"], r["stage"]) for r in missing) == sorted((i, st) for i, st, _ in expected)
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
    crop = labelled["state"]["config"]["train_irn"]["crop_size"]
    boundary, displacement = model.infer(torch.from_numpy(normalize(image)), pad_to=crop)
    size = (row["height"], row["width"])
    cams = torch.from_numpy(row["cams"])
    semantic = algo.semantic_labels(cams, row["class_ids"], boundary, size, steps=64)
    synthesis = labelled["state"]["config"]["synthesis"]
    masks, classes, scores = algo.instance_labels(cams, row["class_ids"], boundary, displacement, size, steps=64,
                                                  grouping=synthesis["grouping"], sigma=synthesis["density_sigma"])
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


def _tree(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def test_rerun_does_no_work_and_grown_manifest_labels_only_new_images(labelled):
    root = labelled["root"]
    state = label.main(labelled["args"])
    assert all(info["status"] == "skipped" for name, info in state["stages"].items() if name != "manifest"), \
        state["stages"]
    old_version = storage.read_text(layout.latest_pointer(root)).strip()
    old_files = _tree(layout.labels_dir(root, old_version))
    old_index = {r["image_id"]: r for r in label_tables.read_index(layout.labels_dir(root, old_version)).to_pylist()}

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
    new_tags = sorted(CLASSES.index(name) + 1 for name in retagged["labels"])
    # The retagged image got a CAM row of its new key; its old row is never used again.
    assert new_tags in [r["class_ids"] for r in cam_rows if r["image_id"] == "syn-000005"]
    new_version = storage.read_text(layout.latest_pointer(root)).strip()
    assert new_version != old_version
    new_dir = layout.labels_dir(root, new_version)
    # The new version's index holds exactly the grown manifest's images: the unchanged ones point
    # into the old version (nothing copied), the four relabelled ones into the new one; images the
    # manifest no longer lists (the re-encoded copies) are left out of it and of its COCO file.
    grown_ids = ["broken-missing"] + [f"syn-{i:06d}" for i in range(12)]
    index = {r["image_id"]: r for r in label_tables.read_index(new_dir).to_pylist()}
    assert sorted(index) == grown_ids
    relabelled = {"broken-missing", "syn-000005", "syn-000010", "syn-000011"}
    assert {i for i, r in index.items() if not r["semantic_uri"].startswith("../")} == relabelled
    assert sorted(os.listdir(os.path.join(new_dir, "semantic"))) == sorted(f"{i}.png" for i in relabelled)
    for image_id, row in index.items():
        if image_id not in relabelled:
            assert row["semantic_uri"] == f"../{old_version}/semantic/{image_id}.png"
            # the same row, but for its doubt, which ranks it among the version's images
            assert {k: v for k, v in row.items() if k not in label_tables.URI_COLUMNS + ("doubt",)} == \
                {k: v for k, v in old_index[image_id].items() if k not in label_tables.URI_COLUMNS + ("doubt",)}
    assert index["syn-000005"]["class_ids"] == new_tags
    semantic = codecs.decode_label_png(storage.read_bytes(storage.resolve(index["syn-000005"]["semantic_uri"], new_dir)))
    assert set(np.unique(semantic)) <= {0, *new_tags}
    coco = json.loads(storage.read_text(layout.coco_file(new_dir)))
    assert sorted(image["file_name"] for image in coco["images"]) == grown_ids
    kept = {image["id"] for image in coco["images"]}
    assert all(ann["image_id"] in kept for ann in coco["annotations"])
    # The previous version is immutable: byte for byte what it was.
    assert _tree(layout.labels_dir(root, old_version)) == old_files
    # The fixed reference is no longer reported as failed: the version's quarantine lists only the
    # images of this manifest that it lacks, with their current reasons.
    assert quarantine.read_quarantine(new_dir).num_rows == 0
    assert "broken-missing" in quarantine.read_quarantine(layout.labels_dir(root, old_version)).column("image_id").to_pylist()
    with Image.open(os.path.join(new_dir, "semantic", "syn-000011.png")) as image:
        assert image.mode == "P"


def test_a_nightly_rerun_writes_files_in_proportion_to_the_new_images(labelled, tmp_path):
    """24 labelled images, then 4 more: at most 40 files written outside report/, run.json,
    manifest/ and models/; the old version untouched; the old images' labels identical."""
    from support import copy_models

    data = str(tmp_path / "data")
    records = codecs.read_parquet(write_synthetic_set(data, num_images=28, seed=21, num_classes=4,
                                                      min_size=64, max_size=80)).to_pylist()
    root = str(tmp_path / "run")
    copy_models(labelled["root"], root)
    manifests = []
    for count in (24, 28):
        manifests.append(os.path.join(data, f"first{count}.jsonl"))
        storage.write_text(manifests[-1], "".join(json.dumps(r) + "\n" for r in records[:count]))
    base = [a for a in labelled["args"] if not a.startswith(("data.manifest=", "run.root="))]
    base = [a for a in base if a != "--set"]
    args = lambda manifest: sum((["--set", a] for a in base + [f"data.manifest={manifest}", f"run.root={root}",
                                                              "run.retrain=never"]), []) + [
        "--only", "cams", "--only", "synthesis", "--only", "publish"]
    label.main(args(manifests[0]))
    before = _tree(root)
    old_version = storage.read_text(layout.latest_pointer(root)).strip()
    state = label.main(args(manifests[1]))
    assert state["stages"]["cams"]["counts"]["done"] == 4 and state["stages"]["synthesis"]["counts"]["done"] == 4
    after = _tree(root)
    ignored = ("report/", "manifest/", "models/", "run.json")  # as the issue counts files
    written = sorted(p for p, data in after.items() if before.get(p) != data and not p.startswith(ignored))
    assert len(written) <= 40, written
    assert not [p for p in before if p not in after and not p.startswith(ignored)]  # nothing deleted
    old_files = {p: d for p, d in before.items() if p.startswith(f"labels/{old_version}/")}
    assert {p: d for p, d in after.items() if p.startswith(f"labels/{old_version}/")} == old_files
    new_dir = layout.labels_dir(root, storage.read_text(layout.latest_pointer(root)).strip())
    old_dir = layout.labels_dir(root, old_version)
    old_index = {r["image_id"]: r for r in label_tables.read_index(old_dir).to_pylist()}
    new_index = {r["image_id"]: r for r in label_tables.read_index(new_dir).to_pylist()}
    assert sorted(new_index) == sorted(r["image_id"] for r in records)
    for image_id, row in old_index.items():
        for column in ("semantic_uri", "instance_uri"):
            old = codecs.decode_label_png(storage.read_bytes(storage.resolve(row[column], old_dir)))
            new = codecs.decode_label_png(storage.read_bytes(storage.resolve(new_index[image_id][column], new_dir)))
            assert np.array_equal(old, new), (image_id, column)


def test_export_status_of_the_labelled_run(labelled, tmp_path):
    from pycocotools.coco import COCO

    from jobs import export, status

    root = labelled["root"]
    labels_dir = _labels_dir(root)
    index = label_tables.read_index(labels_dir).to_pylist()
    voc = str(tmp_path / "voc")
    summary = export.main(["--root", root, "--format", "voc", "--out", voc, "--with-images"])
    assert summary["images"] == len(index)
    assert (tmp_path / "voc" / "ImageSets" / "Segmentation" / "all.txt").read_text().split() == [r["image_id"] for r in index]
    coco = COCO(str(tmp_path / "voc" / "coco.json"))
    for row in index:
        semantic = codecs.decode_label_png((tmp_path / "voc" / "SegmentationClass" / f"{row['image_id']}.png").read_bytes())
        assert np.array_equal(semantic, _png_array(storage.resolve(row["semantic_uri"], labels_dir)))
        objects = codecs.decode_label_png((tmp_path / "voc" / "SegmentationObject" / f"{row['image_id']}.png").read_bytes())
        assert objects.dtype == np.uint8
        assert np.array_equal(objects, _png_array(storage.resolve(row["instance_uri"], labels_dir)))
        (image,) = [im for im in coco.dataset["images"] if im["file_name"].startswith(row["image_id"] + ".")]
        assert (tmp_path / "voc" / "JPEGImages" / image["file_name"]).read_bytes() == storage.read_bytes(row["uri"])
    yolo = export.main(["--root", root, "--format", "yolo", "--out", str(tmp_path / "yolo")])
    assert yolo["images"] == len(index)
    assert sorted(os.listdir(tmp_path / "yolo" / "labels")) == sorted(f"{r['image_id']}.txt" for r in index)
    assert yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())["names"] == dict(enumerate(CLASSES))
    lines = sum(len((tmp_path / "yolo" / "labels" / f"{r['image_id']}.txt").read_text().splitlines()) for r in index)
    assert lines >= sum(r["num_instances"] for r in index)  # one line per connected part of each instance
    plain = export.main(["--root", root, "--format", "coco", "--out", str(tmp_path / "coco")])
    assert plain["annotations"] == len(coco.dataset["annotations"])
    assert sorted(os.listdir(tmp_path / "coco")) == ["coco.json", "sources.csv"]
    sources = (tmp_path / "coco" / "sources.csv").read_text().split()
    assert sources == ['"image_id","source","correction"'] + [f'"{r["image_id"]}","irnet",' for r in index]
    text = status.main(["--root", root])
    assert f"LATEST = {os.path.basename(labels_dir)}" in text and "synthesis" in text and "valid" in text
    assert "no run.json" in status.main(["--root", str(tmp_path / "nothing")])


def test_quality_gate_stops_before_publishing(labelled, tmp_path, caplog):
    import logging
    import shutil

    root = str(tmp_path / "run")
    shutil.copytree(labelled["root"], root)
    latest = storage.read_text(layout.latest_pointer(root))
    state = json.loads(storage.read_text(layout.run_json(root)))
    held_out = state["stages"]["train_cam"]["held_out"]
    assert held_out["images"] == 2 and 0 <= held_out["map"] <= 1  # measured once, kept in run.json
    # What a classifier that learnt nothing would have measured (the tiny one may score anything).
    held_out["map"] = held_out["chance"] / 2
    storage.write_text(layout.run_json(root), json.dumps(state))
    args = [a if not a.startswith("run.root=") else f"run.root={root}" for a in labelled["args"]]
    with caplog.at_level(logging.ERROR, logger="irn-ray"), pytest.raises(SystemExit) as stopped:
        label.main(args + ["--set", "run.min_cam_map=0.6"])
    assert stopped.value.code == 3
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quality gate:")]
    assert f"held-out mAP is {held_out['map']:.3f} on 2 images" in message
    assert "below run.min_cam_map 0.60" in message and "--set run.min_cam_map=0" in message
    assert storage.read_text(layout.latest_pointer(root)) == latest  # nothing published
    state = json.loads(storage.read_text(layout.run_json(root)))
    assert state["stages"]["cams"]["status"] != "running" and state["labels"]["pending"] is None


def test_cams_from_another_source_replace_the_cam_network(labelled, tmp_path):
    from support import copy_models

    from pipeline.data.source_cams import fit_source_cams, read_source_cams

    data, source = str(tmp_path / "data"), str(tmp_path / "cams")
    manifest = write_synthetic_set(data, num_images=6, seed=3, num_classes=3, min_size=64, max_size=80,
                                   style="rings", val_fraction=0, cam_like=source)
    records = {r["image_id"]: r for r in codecs.read_parquet(manifest).to_pylist()}
    os.remove(os.path.join(source, "syn-000001.npz"))
    broken = np.load(os.path.join(source, "syn-000002.npz"))
    np.savez(os.path.join(source, "syn-000002.npz"), cams=np.full_like(broken["cams"], np.nan),
             class_ids=broken["class_ids"])
    np.savez(os.path.join(source, "syn-000003.npz"), cams=np.ones((1, 5, 5), np.float32),
             class_ids=np.array([4]))  # a class the set does not have
    root = str(tmp_path / "run")
    copy_models(labelled["root"], root)
    base = [a for a in labelled["args"] if a != "--set" and not a.startswith(("data.", "run.root=", "train_irn.backbone"))]
    args = sum((["--set", a] for a in base + [f"data.manifest={manifest}", "data.classes=[cross, ellipse, ring]",
                                               f"run.root={root}", f"cams.source={source}", "run.retrain=never",
                                               "train_irn.backbone_init=none"]), [])
    state = label.main(args + ["--only", "train_cam", "--only", "cams", "--only", "synthesis", "--only", "publish"])
    assert state["stages"]["train_cam"]["counts"]["reason"] == "cams.source gives the CAMs"
    assert state["stages"]["cams"]["counts"]["done"] == 3 and state["stages"]["cams"]["counts"]["quarantined"] == 3
    reasons = {r["image_id"]: r["reason"] for r in quarantine.quarantined(root, "cams", ("image_id", "reason")).to_pylist()}
    assert "no source CAM file syn-000001.npz" in reasons["syn-000001"]
    assert "NaN" in reasons["syn-000002"] and "not in 1..3" in reasons["syn-000003"]
    for row in _cam_rows(root).values():
        cams, ids = read_source_cams(open(os.path.join(source, f"{row['image_id']}.npz"), "rb").read())
        tags = [["cross", "ellipse", "ring"].index(n) + 1 for n in records[row["image_id"]]["labels"]]
        low, _ = fit_source_cams(cams, ids, tags, 3, (row["height"], row["width"]))
        assert np.array_equal(row["cams"], low.astype(np.float16).astype(np.float32))
    index = label_tables.read_index(_labels_dir(root))
    assert sorted(index.column("image_id").to_pylist()) == ["syn-000000", "syn-000004", "syn-000005"]


def test_tune_sweeps_thresholds_on_the_stored_cams(labelled):
    from jobs import tune
    from pipeline import plan
    from pipeline.algorithms.metrics import confusion, mean_iou
    from pipeline.models.store import load_trained
    from pipeline.plan import read_manifest
    from pipeline.stages.synthesis import padded_input

    root = labelled["root"]
    result = tune.main(["--root", root, "--max-images", "3", "--betas", "5", "10", "--thresholds", "0.2", "0.4"])
    assert result["images"] == 3 and len(result["semantic"]) == 4 and len(result["instance"]) == 4
    assert result["best_semantic"]["miou"] == max(r["miou"] for r in result["semantic"])
    assert json.loads(storage.read_text(storage.join(layout.report_dir(root), "tune.json")))["images"] == 3
    # One point of the sweep, computed directly: the stored CAMs, IRNet on the padded image, the walk.
    state = json.loads(storage.read_text(layout.run_json(root)))  # a later manifest than the fixture's
    config = state["config"]
    manifest_dir = layout.manifest_dir(root, state["manifest"]["stamp"])
    manifest = {r["image_id"]: r for r in read_manifest(manifest_dir).to_pylist()}
    current = plan.current_cams(root, manifest_dir, CLASSES, state["stages"]["cams"]["key"])
    shards = dict(zip(current.column("image_id").to_pylist(), current.column("cam_shard").to_pylist()))
    net = load_trained(root, "irn")
    matrix = 0
    for image_id in result["image_ids"]:
        (row,) = read_cam_rows(storage.join(layout.cams_dir(root), shards[image_id]), [image_id])
        image = decode_image(storage.read_bytes(row["uri"]))
        (out,) = net.infer_padded(torch.from_numpy(padded_input(image, config["train_irn"]["crop_size"]))[None],
                                  [image.shape[:2]])
        labels = algo.semantic_labels(torch.from_numpy(row["cams"]), row["class_ids"], out.boundary, image.shape[:2],
                                      bg_threshold=0.4, beta=5.0, steps=config["synthesis"]["steps"])
        gt = codecs.decode_label_png(storage.read_bytes(manifest[image_id]["gt_semantic_uri"]))
        matrix = matrix + confusion(labels, gt, len(CLASSES) + 1)
    (entry,) = [r for r in result["semantic"] if r["beta"] == 5.0 and r["sem_bg_threshold"] == 0.4]
    assert abs(entry["miou"] - mean_iou(matrix)["mean"]) < 1e-9
