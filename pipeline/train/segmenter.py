"""Train DeepLab or Mask R-CNN on a labels version with Ray Train (paper Sec. 6.3-6.4).

Inputs stream through Ray Data from the version's index: each image with its semantic PNG
(DeepLab) or its instance-id PNG and the classes of its instances (Mask R-CNN), or, for the upper
bound (``segmenter.labels: ground_truth``), the manifest's ground truth instead. Decode and the
joint image/label augmentation (pipeline.data.segmentation) run in CPU actors; the trainer runs
the torchvision model under DDP with the shared loop (checkpoints in the run root, resume).
Images held out for evaluation (split 'val' or the hash) never train.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from pipeline import label_tables, plan
from pipeline.data.classes import Vocabulary
from pipeline.data.images import UNREADABLE, read_inputs, unreadable_reason
from pipeline.data.segmentation import instance_masks, instance_train_sample, semantic_train_sample
from pipeline.io import codecs, layout, storage, tables
from pipeline.models.segmenters import build_segmenter
from pipeline.train import common, inputs

log = logging.getLogger(__name__)
COLUMNS = ["uri", "semantic_uri", "instance_uri", "instance_classes"]


def _pseudo_classes(index: pa.Table, labels_dir: str) -> list[str]:
    """JSON {instance id: class id} of each index row's instances (score > 0: fragments under
    synthesis.min_fragment are left out, as the evaluation ranks them last)."""
    found: dict[str, dict[int, int]] = {}
    for shard in sorted(set(index.column("instances_uri").to_pylist())):
        rows = codecs.read_parquet_columns(storage.resolve(shard, labels_dir),
                                           ["image_id", "instance_id", "class_id", "score"])
        for r in rows.to_pylist():
            if r["score"] > 0:
                found.setdefault(r["image_id"], {})[r["instance_id"]] = r["class_id"]
    return [json.dumps(found.get(i, {})) for i in index.column("image_id").to_pylist()]


def segmenter_rows(labels_dir: str, manifest_dir: str, classes: list[str], *, labels: str,
                   evaluation: bool = False, limit: int | None = None) -> tuple[pa.Table, int]:
    """Task: training rows (COLUMNS) of a labels version, or with ``evaluation`` the first ``limit``
    (by id) held-out images that have ground truth (with their ground truth); and their count.

    ``labels``: 'pseudo' (the version's labels) or 'ground_truth' (the manifest's, the upper bound).
    """
    manifest = plan.read_manifest(manifest_dir)
    index = label_tables.read_index(labels_dir, ["image_id", "semantic_uri", "instance_uri", "instances_uri"])
    has_gt = pc.and_(pc.not_equal(manifest.column("gt_semantic_uri"), ""), pc.not_equal(manifest.column("gt_instance_uri"), ""))
    held_out = manifest.column("held_out")
    if evaluation or labels == "ground_truth":
        wanted = pc.and_(has_gt, held_out if evaluation else pc.invert(held_out))
        rows = tables.join_rows(manifest.filter(wanted), index.select(["image_id"]), ["image_id"], "left semi")
        if evaluation:
            rows = rows.sort_by("image_id").slice(0, limit)
        vocabulary = Vocabulary(classes)
        instance_classes = [json.dumps({k + 1: vocabulary.get(n) for k, n in enumerate(names or [])
                                        if vocabulary.get(n) is not None})
                            for names in rows.column("gt_instance_classes").to_pylist()]
        table = pa.table({"image_id": rows.column("image_id"), "uri": rows.column("uri"),
                          "semantic_uri": rows.column("gt_semantic_uri"), "instance_uri": rows.column("gt_instance_uri"),
                          "instance_classes": pa.array(instance_classes, pa.string())})
        return table, table.num_rows
    train = manifest.filter(pc.invert(held_out)).select(["image_id", "uri"])
    rows = tables.join_rows(index, train, ["image_id"], "inner", extra=["uri"])
    resolve = lambda column: pa.array([storage.resolve(u, labels_dir) for u in rows.column(column).to_pylist()])  # noqa: E731
    table = pa.table({"image_id": rows.column("image_id"), "uri": rows.column("uri"),
                      "semantic_uri": resolve("semantic_uri"), "instance_uri": resolve("instance_uri"),
                      "instance_classes": pa.array(_pseudo_classes(rows, labels_dir), pa.string())})
    return table, table.num_rows


class SegmenterSamples:
    """Sample maker (pipeline.train.inputs) of ``model``: rows (COLUMNS) -> augmented samples
    (DeepLab: image, target; Mask R-CNN: image, masks, boxes, labels); a row whose files do not
    decode is left out."""

    def __init__(self, *, model: str, base_size: int, crop_size: int, max_pixels: int):
        self.model, self.base, self.crop, self.max_pixels = model, base_size, crop_size, max_pixels
        self.decoded_keys = ("image", "label") if model == "deeplab" else ("image", "masks", "labels")
        self.sample_keys = ("image", "target") if model == "deeplab" else ("image", "masks", "boxes", "labels")

    def decode(self, row: dict[str, Any]) -> dict[str, np.ndarray] | None:
        uri = row["uri"]
        column = "semantic_uri" if self.model == "deeplab" else "instance_uri"
        try:
            image, label = read_inputs(uri, row[column], max_pixels=self.max_pixels)
        except UNREADABLE as err:
            log.warning("skipping %s in segmenter training: %s", uri, unreadable_reason(err))
            return None
        if self.model == "deeplab":
            return {"image": image, "label": label}
        masks, labels = instance_masks(label, {int(k): v for k, v in json.loads(str(row["instance_classes"])).items()})
        return {"image": image, "masks": masks, "labels": labels}

    def augment(self, decoded: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = np.asarray(decoded["image"])
        if self.model == "deeplab":
            x, target = semantic_train_sample(image, np.asarray(decoded["label"]), rng, base_size=self.base,
                                              crop_size=self.crop)
            return {"image": x, "target": target}
        x, masks, boxes = instance_train_sample(image, np.asarray(decoded["masks"], np.uint8), rng)
        return {"image": x, "masks": masks, "boxes": boxes, "labels": np.asarray(decoded["labels"], np.int64)}

    def collate(self, rows: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, Any]:
        if self.model == "deeplab":
            return {"image": inputs.stack(rows, "image", device, np.float32),
                    "target": inputs.stack(rows, "target", device, np.int64)}
        # Mask R-CNN: lists of images and target dicts (images differ in size).
        return {"image": [torch.as_tensor(np.asarray(r["image"], np.float32), device=device) for r in rows],
                "targets": [{"boxes": torch.as_tensor(np.asarray(r["boxes"], np.float32), device=device).reshape(-1, 4),
                             "labels": torch.as_tensor(np.asarray(r["labels"], np.int64), device=device),
                             "masks": torch.as_tensor(np.asarray(r["masks"], np.uint8), device=device)}
                            for r in rows]}


def segmenter_samples(config: dict[str, Any]) -> SegmenterSamples:
    return SegmenterSamples(model=config["model"], base_size=config["base_size"], crop_size=config["crop_size"],
                            max_pixels=config["max_pixels"])


def train_segmenter_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train per-worker loop. ``config``: the ``segmenter`` section plus num_classes, max_step."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(config["seed"])
    init = config["backbone_init"]
    source = init if init in ("none", "imagenet") else io.BytesIO(storage.read_bytes(init))
    net = build_segmenter(config["model"], config["num_classes"], depth=config["depth"], backbone_init=source,
                          min_size=config["min_size"], max_size=config["max_size"],
                          rpn_proposals=config["rpn_proposals"], roi_samples=config["roi_samples"])
    optimizer = common.make_optimizer([([p for p in net.parameters() if p.requires_grad], config["lr"])],
                                      config["weight_decay"], config["optimizer"], config["momentum"])
    maker = segmenter_samples(config)

    def batches(shard, batch_size: int, seed: int, device: torch.device):
        return inputs.augmented_batches(maker, shard, batch_size, seed, device, decoded=config["decode_once"],
                                        drop_last=config["drop_last"])

    if config["model"] == "deeplab":
        def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            with common.autocast(batch["image"].device, config["bf16"]):
                logits = model(batch["image"])["out"]
            return F.cross_entropy(logits.float(), batch["target"], ignore_index=255)
    else:
        def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            with common.autocast(batch["image"][0].device, config["bf16"]):
                losses = model(batch["image"], batch["targets"])
            return sum(v.float() for v in losses.values())

    return common.fit_epochs(f"train_{config['model']}", net, optimizer, config, loss_fn, batches=batches)


def train_segmenter(cfg, table_ref, num_images: int, classes: list[str], *, name: str, model_uri: str) -> dict[str, Any]:
    """Train ``segmenter.model`` on the rows behind ``table_ref`` and export it to ``model_uri``."""
    section = cfg.segmenter
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers,
                                                       drop_last=section.model == "deeplab")
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    decode_once = inputs.decodes_once(num_images, cfg.run.decode_once_max_images)
    loop_config = {**vars(section), "num_classes": len(classes), "max_step": max_step, "seed": cfg.run.seed,
                   "poly_power": 0.9, "drop_last": section.model == "deeplab",  # BatchNorm: no batch of one
                   "max_pixels": cfg.data.max_pixels, "decode_once": decode_once,
                   "backbone_init": backbone_weights(cfg)}
    data = inputs.training_dataset(table_ref, segmenter_samples(loop_config), decode_once=decode_once, rows_per_block=8)
    result = common.run_trainer(train_segmenter_loop, loop_config, {"train": data}, root=cfg.run.root, name=name,
                                num_workers=section.num_workers, use_gpu=section.use_gpu,
                                cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures)
    return common.export_model(result, model_uri, {"network": section.model, "classes": classes,
                                                   "config": vars(section), "num_images": num_images})


def backbone_weights(cfg) -> str:
    """``segmenter.backbone_init`` resolved: ``cam`` is the run's exported CAM network."""
    init = cfg.segmenter.backbone_init
    if init != "cam":
        return init
    uri = layout.model_file(cfg.run.root, "cam")
    if not storage.exists(uri):
        raise ValueError(f"segmenter.backbone_init: cam needs the run's trained CAM network ({uri}), and this run has "
                         "none (cams.source gives its CAMs); use none, imagenet or a weights file")
    depth = json.loads(storage.read_text(uri + ".json"))["config"]["depth"]
    if depth != cfg.segmenter.depth:
        raise ValueError(f"segmenter.backbone_init: cam is a ResNet-{depth}; set segmenter.depth={depth}")
    return uri
