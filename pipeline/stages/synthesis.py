"""Stage: IRNet inference + label synthesis per image (actor pool, GPU when present, else CPU).

Reads the CAM shards, writes into a labels version directory ``labels/<V>/``: the semantic PNG
(VOC palette), the 16-bit instance-id PNG, ``instances/part-*.parquet`` (one row per instance,
COCO RLE) and ``images/part-*.parquet`` (one row per labelled image; an image is done when it is
listed there). Methods: ``irnet`` (the paper), ``cam_boundary`` (no displacement) and ``cam``
(threshold + components) for the ablations of Table 1.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pycocotools import mask as mask_utils

from pipeline.algorithms import synthesis as algo
from pipeline.config import Config, SynthesisConfig
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage
from pipeline.stages import common
from pipeline.stages.cams import pick_device, read_cam_rows
from pipeline.train.common import load_trained

log = logging.getLogger(__name__)
STAGE = "synthesis"

IMAGE_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("height", pa.int32()),
                          ("width", pa.int32()), ("num_instances", pa.int32()),
                          ("class_ids", pa.list_(pa.int32()))])  # the tags the labels were made for
INSTANCE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("instance_id", pa.int32()), ("class_id", pa.int32()),
    ("score", pa.float32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float32(), 4)),
    ("rle_counts", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
])


def synthesize(method: str, cams: np.ndarray, class_ids: list[int], image_size: tuple[int, int],
               boundary: torch.Tensor | None, displacement: torch.Tensor | None, params: SynthesisConfig,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Semantic map uint8 [H, W] and instances (masks bool [N, H, W], classes, scores) by ``method``."""
    walk = {"beta": params.beta, "steps": params.steps, "radius": params.radius}
    cams_t = torch.from_numpy(np.array(cams, dtype=np.float32))
    if boundary is not None:
        cams_t = cams_t.to(boundary.device)
    if method == "cam":
        semantic = algo.cam_semantic_labels(cams_t, class_ids, image_size, bg_threshold=params.cam_bg_threshold)
        instances = algo.cam_instance_labels(cams_t, class_ids, image_size, bg_threshold=params.cam_bg_threshold,
                                             min_fragment=params.min_fragment)
        return (semantic, *instances)
    semantic = algo.semantic_labels(cams_t, class_ids, boundary, image_size,
                                    bg_threshold=params.sem_bg_threshold, **walk)
    if method == "cam_boundary":
        instances = algo.cam_boundary_instance_labels(cams_t, class_ids, boundary, image_size,
                                                      bg_threshold=params.ins_bg_threshold,
                                                      min_fragment=params.min_fragment, **walk)
    else:
        instances = algo.instance_labels(cams_t, class_ids, boundary, displacement, image_size,
                                         bg_threshold=params.ins_bg_threshold, iterations=params.centroid_iterations,
                                         threshold=params.centroid_threshold, min_fragment=params.min_fragment, **walk)
    return (semantic, *instances)


def instance_id_map(masks: np.ndarray, scores: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """uint16 [H, W] of instance ids 1..N (mask i -> id i + 1); higher scores drawn on top."""
    ids = np.zeros(image_size, np.uint16)
    for i in np.argsort(scores, kind="stable"):
        ids[masks[i]] = i + 1
    return ids


def instance_rows(image_id: str, masks: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One COCO-style record per instance: RLE, area, bbox [x, y, w, h], score."""
    rows = []
    for i, mask in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rows.append({"image_id": image_id, "instance_id": i + 1, "class_id": int(classes[i]),
                     "score": float(scores[i]), "area": int(mask_utils.area(rle)),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "rle_counts": rle["counts"].decode("ascii"),
                     "height": int(mask.shape[0]), "width": int(mask.shape[1])})
    return rows


class Synthesize:
    """Actor: loads IRNet once (not needed for ``cam``); labels a batch of CAM rows and writes it."""

    def __init__(self, *, labels_dir: str, root: str, method: str, params: dict[str, Any], max_pixels: int,
                 gpus: float, stage: str = STAGE):
        self.labels_dir, self.root, self.method, self.max_pixels = labels_dir, root, method, max_pixels
        self.stage = stage
        self.params = SynthesisConfig(**params)
        self.device = pick_device(gpus)
        self.model = None
        if method != "cam":
            self.model = load_trained(root, "irn").to(self.device)

    def label_one(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        size = (int(row["height"]), int(row["width"]))
        boundary = displacement = None
        if self.model is not None:
            image = decode_image(storage.read_bytes(row["uri"]), max_pixels=self.max_pixels)
            if image.shape[:2] != size:
                raise ValueError(f"image is {image.shape[:2]} but its CAMs were made for {size}")
            x = torch.from_numpy(normalize(image)).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                boundary, displacement = self.model.infer(x)
        return synthesize(self.method, row["cams"], list(row["class_ids"]), size, boundary, displacement,
                          self.params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, instances, quarantine, statuses = [], [], [], []
        for i in range(len(batch["image_id"])):
            row = {key: batch[key][i] for key in batch}
            image_id = str(row["image_id"])
            try:
                semantic, masks, classes, scores = self.label_one(row)
                storage.write_bytes(layout.semantic_png(self.labels_dir, image_id), codecs.encode_semantic_png(semantic))
                storage.write_bytes(layout.instance_png(self.labels_dir, image_id),
                                    codecs.encode_instance_png(instance_id_map(masks, scores, semantic.shape)))
            except Exception as err:  # noqa: BLE001 - one bad image must not fail the block
                log.exception("synthesis failed for %s", image_id)
                reason = err.reason if isinstance(err, ImageDecodeError) else f"{type(err).__name__}: {err}"
                quarantine.append({"image_id": image_id, "uri": str(row["uri"]), "reason": f"synthesis failed ({reason})"})
                statuses.append("quarantined")
                continue
            instances += instance_rows(image_id, masks, classes, scores)
            images.append({"image_id": image_id, "uri": str(row["uri"]), "height": semantic.shape[0],
                           "width": semantic.shape[1], "num_instances": len(masks),
                           "class_ids": [int(c) for c in row["class_ids"]]})
            statuses.append("done")
        common.write_quarantine(self.root, self.stage, quarantine)
        if images:
            ids = [r["image_id"] for r in images]
            # Instances first: an image counts as done only once its images row exists.
            codecs.write_parquet(storage.join(self.labels_dir, "instances", layout.part_name(ids)),
                                 pa.Table.from_pylist(instances, schema=INSTANCE_SCHEMA))
            codecs.write_parquet(storage.join(self.labels_dir, "images", layout.part_name(ids)),
                                 pa.Table.from_pylist(images, schema=IMAGE_SCHEMA))
        return common.status_batch(statuses)


def _read_pending(item: dict[str, Any], *, pending: dict[str, str | None]) -> list[dict[str, Any]]:
    """flat_map: the rows of one CAM shard whose image is still to be labelled, each with the uri
    the manifest now gives (the file may have moved since its CAMs were made)."""
    rows = [row for row in read_cam_rows(item["uri"]) if row["image_id"] in pending]
    for row in rows:
        row["uri"] = pending[row["image_id"]] or row["uri"]
    return rows


def current_labels(made_for: dict[str, tuple], labels_dir: str) -> tuple[set[str], set[str]]:
    """(ids labelled in ``labels_dir`` from their current CAM rows, ids labelled from older ones).

    ``made_for``: :func:`common.read_class_ids` of the CAM shards. An image's labels are out of
    date when its CAMs were remade for other tags.
    """
    labelled = common.read_class_ids(storage.join(labels_dir, "images"))
    current = {i for i, tags in labelled.items() if i in made_for and made_for[i] == tags}
    return current, set(labelled) - current


def run_synthesis(cfg: Config, labels_dir: str, *, method: str | None = None,
                  uris: dict[str, str] | None = None, stage: str = STAGE) -> dict[str, int]:
    """Label every CAM row not yet labelled in ``labels_dir`` from its current CAMs; counts by status.

    ``uris``: only these images (image_id -> where the image file is now); None = every CAM row,
    read from the uri its CAMs were made from. ``labels_dir`` must not be a published version:
    out-of-date rows (and rows of images not in ``uris``) are removed from it first.
    """
    import ray.data

    root = cfg.run.root
    method = method or cfg.synthesis.method
    cams = common.read_class_ids(layout.cams_dir(root))
    wanted = set(cams) if uris is None else set(cams) & set(uris)
    current, stale = current_labels(cams, labels_dir)
    if uris is not None:  # labels of images no longer asked for leave this directory too
        stale |= current - set(uris)
        current &= set(uris)
    pending = wanted - current - common.quarantined_ids(root, stage)
    # Instance rows go for out-of-date images and for images about to be labelled (a writer that
    # died between its two shards, or a version copy cut short, can leave them without an images
    # row; labelling again would add them a second time). The images row, the marker, goes last.
    common.drop_rows(storage.join(labels_dir, "instances"), stale | pending)
    for image_id in stale:
        storage.remove(layout.semantic_png(labels_dir, image_id))
        storage.remove(layout.instance_png(labels_dir, image_id))
    common.drop_rows(storage.join(labels_dir, "images"), stale)
    if not pending:
        return {"skipped": len(wanted)}
    shards = storage.list_files(layout.cams_dir(root), ".parquet")
    section = cfg.synthesis
    ds = ray.data.from_items([{"uri": uri} for uri in shards]).flat_map(
        _read_pending, fn_kwargs={"pending": {i: (uris or {}).get(i) for i in pending}}, num_cpus=0.25,
    ).map_batches(
        Synthesize, batch_size=section.batch_size, batch_format="numpy",
        fn_constructor_kwargs={
            "labels_dir": labels_dir, "root": root, "method": method, "params": vars(section),
            "max_pixels": cfg.data.max_pixels, "gpus": section.gpus_per_actor, "stage": stage},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=section.num_actors),
        num_cpus=section.cpus_per_actor, num_gpus=section.gpus_per_actor)
    counts = common.summarise(ds)
    common.finish_stage(*(storage.join(labels_dir, sub) for sub in ("semantic", "instance", "instances", "images")),
                        layout.quarantine_dir(root))
    counts["skipped"] = len(wanted) - len(pending)
    return counts
