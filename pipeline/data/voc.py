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


def voc_manifest_rows(voc_root: str, image_set: str = "train") -> list[ManifestRow]:
    """Rows for the ids of ``ImageSets/Segmentation/<image_set>.txt`` (else ``ImageSets/Main``)."""
    lists = [storage.join(voc_root, "ImageSets", sub, f"{image_set}.txt") for sub in ("Segmentation", "Main")]
    list_uri = next((uri for uri in lists if storage.exists(uri)), None)
    if list_uri is None:
        raise FileNotFoundError(f"no image set list {image_set}.txt under {voc_root}/ImageSets")
    rows = []
    for line in storage.read_text(list_uri).splitlines():
        image_id = line.split()[0] if line.strip() else ""
        if not image_id:
            continue
        xml_uri = storage.join(voc_root, "Annotations", f"{image_id}.xml")
        labels = _xml_labels(storage.read_bytes(xml_uri)) if storage.exists(xml_uri) else []
        row = ManifestRow(image_id=image_id, uri=storage.join(voc_root, "JPEGImages", f"{image_id}.jpg"),
                          labels=labels, split=image_set)
        class_uri = storage.join(voc_root, "SegmentationClass", f"{image_id}.png")
        object_uri = storage.join(voc_root, "SegmentationObject", f"{image_id}.png")
        if storage.exists(class_uri):
            row.gt_semantic_uri = class_uri
            if storage.exists(object_uri):
                row.gt_instance_uri = object_uri
                row.gt_instance_classes = _instance_classes(storage.read_bytes(class_uri),
                                                            storage.read_bytes(object_uri))
        rows.append(row)
    return rows


def write_voc_manifest(voc_root: str, out_uri: str, image_set: str = "train") -> str:
    """Build the manifest of a VOC image set and write it (Parquet) to ``out_uri``."""
    codecs.write_parquet(out_uri, rows_to_table(voc_manifest_rows(voc_root, image_set)))
    return out_uri
