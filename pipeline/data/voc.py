"""PASCAL VOC 2012 devkit -> manifest (with ground-truth semantic and instance URIs).

Image-level tags come from ``Annotations/<id>.xml`` (every object name, as the paper's VOC setting
uses); ground truth from ``SegmentationClass`` / ``SegmentationObject`` when the PNGs exist. The
class of each ground-truth instance is read off the class PNG under that instance.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np

from pipeline.data.manifest import ManifestRow, rows_to_table
from pipeline.io import codecs, storage

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def _xml_labels(xml_bytes: bytes) -> list[str]:
    root = ET.fromstring(xml_bytes)
    return sorted({(obj.findtext("name") or "").strip() for obj in root.iter("object")} - {""})


def _instance_classes(class_png: bytes, object_png: bytes) -> list[str]:
    """Class name of instance ids 1..N (majority class id under each instance, ignoring 0/255)."""
    classes, objects = codecs.decode_label_png(class_png), codecs.decode_label_png(object_png)
    names = []
    for instance_id in range(1, int(objects[objects < 255].max(initial=0)) + 1):
        values = classes[(objects == instance_id) & (classes > 0) & (classes < 255)]
        if values.size == 0:
            names.append("")
            continue
        names.append(VOC_CLASSES[int(np.bincount(values).argmax()) - 1])
    return names


def _image_ids(voc_root: str, image_set: str) -> list[str]:
    """Ids of an image set: a name under ``ImageSets/Segmentation`` (else ``ImageSets/Main``), or
    the path/URI of a list file (e.g. the official code's ``voc12/train_aug.txt``)."""
    if image_set.endswith(".txt"):
        candidates = [image_set]
    else:
        candidates = [storage.join(voc_root, "ImageSets", sub, f"{image_set}.txt") for sub in ("Segmentation", "Main")]
    list_uri = next((uri for uri in candidates if storage.exists(uri)), None)
    if list_uri is None:
        raise FileNotFoundError(f"no image set list {image_set!r} under {voc_root}/ImageSets (for train_aug, put the "
                                "official code's voc12/train_aug.txt in ImageSets/Segmentation)")
    return [line.split()[0] for line in storage.read_text(list_uri).splitlines() if line.strip()]


def voc_manifest_rows(voc_root: str, image_set: str = "train", *, ground_truth: bool | str = True,
                      split: str | None = None) -> list[ManifestRow]:
    """Rows for the ids of ``image_set`` (see :func:`_image_ids`), tagged from their annotations.

    Ground truth is attached from ``SegmentationClass`` / ``SegmentationObject`` where the PNGs
    exist: for every image (True), none (False), or the ids of the image set named by a string.
    ``split`` defaults to the image set's name.
    """
    if ground_truth is False:
        gt_ids: set[str] | None = set()
    else:
        gt_ids = set(_image_ids(voc_root, ground_truth)) if isinstance(ground_truth, str) else None
    rows = []
    for image_id in _image_ids(voc_root, image_set):
        xml_uri = storage.join(voc_root, "Annotations", f"{image_id}.xml")
        labels = _xml_labels(storage.read_bytes(xml_uri)) if storage.exists(xml_uri) else []
        row = ManifestRow(image_id=image_id, uri=storage.join(voc_root, "JPEGImages", f"{image_id}.jpg"),
                          labels=labels, split=split if split is not None else image_set)
        class_uri = storage.join(voc_root, "SegmentationClass", f"{image_id}.png")
        object_uri = storage.join(voc_root, "SegmentationObject", f"{image_id}.png")
        if (gt_ids is None or image_id in gt_ids) and storage.exists(class_uri):
            row.gt_semantic_uri = class_uri
            if storage.exists(object_uri):
                row.gt_instance_uri = object_uri
                row.gt_instance_classes = _instance_classes(storage.read_bytes(class_uri),
                                                            storage.read_bytes(object_uri))
        rows.append(row)
    return rows


def write_voc_manifest(voc_root: str, out_uri: str, image_set: str = "train", *, ground_truth_set: str | None = None,
                       held_out_set: str | None = None) -> str:
    """Build the manifest of a VOC image set and write it (Parquet) to ``out_uri``.

    The paper's setting: ``image_set="train_aug"`` (10,582 images, split 'train': CAM and IRNet
    train on them and all are labelled), ``ground_truth_set="train"`` (the 1,464 evaluated, as
    the official code evaluates on train), ``held_out_set="val"`` (1,449 images, split 'val', no
    ground truth: they measure the CAM classifier for the quality gate and never train).
    """
    rows = voc_manifest_rows(voc_root, image_set, ground_truth=ground_truth_set or True,
                             split="train" if held_out_set else None)
    if held_out_set:
        rows += voc_manifest_rows(voc_root, held_out_set, ground_truth=False, split="val")
    codecs.write_parquet(out_uri, rows_to_table(rows))
    return out_uri
