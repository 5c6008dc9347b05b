"""End to end: jobs.label on a tiny synthetic set (tiny backbone, few steps) on local Ray.

One labelled run (module fixture) is inspected by several tests: every output of DESIGN §3, the
quarantine of broken inputs, the COCO export, the stage's labels against a direct call of the
algorithms, the report, a rerun that does no work, and a grown manifest.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs import label
from pipeline.algorithms import synthesis as algo
from pipeline.data.images import decode_image
from pipeline.data.synthetic import write_synthetic_set
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage
from pipeline.stages.cams import read_cam_rows
from pipeline.train.common import load_exported

pytestmark = pytest.mark.slow
CLASSES = ["cross", "diamond", "disc", "square"]
BROKEN = {"broken-empty": "empty file", "broken-truncated": "truncated", "broken-missing": "not found"}


def tiny_config(tmp: str, manifest: str) -> list[str]:
    return [f"data.manifest={manifest}", f"data.classes=[{', '.join(CLASSES)}]", f"run.root={tmp}/run",
            "train_cam.depth=18", "train_cam.backbone_init=none", "train_cam.batch_size=4", "train_cam.epochs=1",
            "train_cam.crop_size=64", "train_cam.resize_long=[64, 80]", "train_cam.cpus_per_worker=0.5",
            "cams.scales=[1.0, 0.5]", "cams.cpus_per_actor=0.5", "relations.cpus_per_task=0.5",
            "train_irn.depth=18", "train_irn.batch_size=4", "train_irn.epochs=1", "train_irn.crop_size=64",
            "train_irn.cpus_per_worker=0.5", "synthesis.cpus_per_actor=0.5", "synthesis.steps=64",
            "eval.num_previews=2"]


def _manifest_with_broken_rows(data: str, count: int) -> str:
    """The synthetic manifest plus broken images and bad rows, as JSON Lines."""
    base = write_synthetic_set(data, num_images=count, seed=11, num_classes=4, min_size=64, max_size=80)
    records = codecs.read_parquet(base).to_pylist()
    open(os.path.join(data, "images", "broken-empty.png"), "wb").close()
    good = storage.read_bytes(os.path.join(data, "images", "syn-000001.png"))
    storage.write_bytes(os.path.join(data, "images", "broken-truncated.png"), good[: len(good) // 2])
    for image_id in BROKEN:
        records.append({"image_id": image_id, "uri": f"images/{image_id}.png", "labels": ["disc"]})
    records.append({"image_id": "../escape", "uri": "images/syn-000002.png", "labels": ["disc"]})
    records.append({"image_id": "unicorn-1", "uri": "images/syn-000002.png", "labels": ["unicorn"]})
    path = os.path.join(data, "manifest.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_session):
    tmp = str(tmp_path_factory.mktemp("label"))
    manifest = _manifest_with_broken_rows(os.path.join(tmp, "data"), 10)
    overrides = tiny_config(tmp, manifest)
    args = sum((["--set", o] for o in overrides), [])
    state = label.main(args)
    return {"tmp": tmp, "root": f"{tmp}/run", "args": args, "state": state, "manifest": manifest}


def _valid_ids(run):
    return [f"syn-{i:06d}" for i in range(10)]


def test_every_valid_image_has_every_output(labelled):
    root, state = labelled["root"], labelled["state"]
    version = storage.read_text(layout.latest_pointer(root)).strip()
    assert state["last_run"]["labels_version"] == version
    cam_rows = {r["image_id"]: r for uri in storage.list_files(layout.cams_dir(root), ".parquet")
                for r in read_cam_rows(uri)}
    assert sorted(cam_rows) == _valid_ids(labelled)
    labels_dir = layout.labels_dir(root, version)
    for image_id, row in cam_rows.items():
        h, w = row["height"], row["width"]
        assert row["cams"].shape == (len(row["class_ids"]), -(-h // 4), -(-w // 4))
        assert codecs.decode_label_png(storage.read_bytes(layout.relation_png(root, image_id))).shape == (h, w)
        semantic = codecs.decode_label_png(storage.read_bytes(layout.semantic_png(labels_dir, image_id)))
        instance = codecs.decode_label_png(storage.read_bytes(layout.instance_png(labels_dir, image_id)))
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


def test_broken_inputs_are_quarantined_with_reasons(labelled):
    rows = pa.concat_tables([codecs.read_parquet(u) for u in
                             storage.list_files(layout.quarantine_dir(labelled["root"]), ".parquet")]).to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert set(by_id) == set(BROKEN) | {"../escape", "unicorn-1"}
    for image_id, words in BROKEN.items():
        assert by_id[image_id]["stage"] == "cams" and words in by_id[image_id]["reason"]
    assert by_id["../escape"]["stage"] == "manifest" and "unsafe" in by_id["../escape"]["reason"]
    assert "unknown class" in by_id["unicorn-1"]["reason"]
    # Nothing was written outside the run root for the unsafe id.
    assert not os.path.exists(os.path.join(labelled["tmp"], "escape.png"))


def test_coco_loads_and_masks_match_instance_pngs(labelled):
    from pycocotools.coco import COCO

    root = labelled["root"]
    labels_dir = layout.labels_dir(root, storage.read_text(layout.latest_pointer(root)).strip())
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
    labels_dir = layout.labels_dir(root, storage.read_text(layout.latest_pointer(root)).strip())
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

    grown = os.path.join(labelled["tmp"], "grown")
    manifest = write_synthetic_set(grown, num_images=12, seed=11, num_classes=4, min_size=64, max_size=80)
    args = [a if not a.startswith("data.manifest=") else f"data.manifest={manifest}" for a in labelled["args"]]
    state = label.main(args)
    stages = state["stages"]
    assert stages["train_cam"]["status"] == "skipped" and stages["train_irn"]["status"] == "skipped"
    assert stages["cams"]["counts"]["done"] == 2 and stages["synthesis"]["counts"]["done"] == 2
    new_version = storage.read_text(layout.latest_pointer(root)).strip()
    assert new_version != old_version
    new_dir = layout.labels_dir(root, new_version)
    assert len(os.listdir(os.path.join(new_dir, "semantic"))) == 12
    # The previous version is immutable: untouched by the nightly rerun.
    assert sorted(os.listdir(os.path.join(layout.labels_dir(root, old_version), "semantic"))) == old_files
    with Image.open(os.path.join(new_dir, "semantic", "syn-000011.png")) as image:
        assert image.mode == "P"
