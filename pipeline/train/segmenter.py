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

from pipeline import ledger
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.segmentation import instance_masks, instance_train_sample, semantic_train_sample
from pipeline.io import codecs, storage, tables
from pipeline.models.segmenters import build_segmenter
from pipeline.stages import plan
from pipeline.stages.common import dataset
from pipeline.train import common

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
    index = ledger.read_index(labels_dir, ["image_id", "semantic_uri", "instance_uri", "instances_uri"])
    has_gt = pc.and_(pc.not_equal(manifest.column("gt_semantic_uri"), ""), pc.not_equal(manifest.column("gt_instance_uri"), ""))
    held_out = manifest.column("held_out")
    if evaluation or labels == "ground_truth":
        wanted = pc.and_(has_gt, held_out if evaluation else pc.invert(held_out))
        rows = tables.join_rows(manifest.filter(wanted), index.select(["image_id"]), ["image_id"], "left semi")
        if evaluation:
            rows = rows.sort_by("image_id").slice(0, limit)
        lookup = {name: i + 1 for i, name in enumerate(classes)}
        instance_classes = [json.dumps({k + 1: lookup[n] for k, n in enumerate(names or []) if n in lookup})
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


class SegmenterBatch:
    """Ray Data map: rows (COLUMNS) -> augmented training samples of ``model``; a row whose files
    do not decode is left out."""

    def __init__(self, *, model: str, base_size: int, crop_size: int, max_pixels: int, seed: int | None = None):
        self.model, self.base, self.crop, self.max_pixels = model, base_size, crop_size, max_pixels
        self.rng = np.random.default_rng(seed)  # None (training): fresh draws in every actor and epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {k: [] for k in (("image", "target") if self.model == "deeplab"
                                                else ("image", "masks", "boxes", "labels"))}
        for uri, semantic_uri, instance_uri, classes in zip(batch["uri"], batch["semantic_uri"],
                                                            batch["instance_uri"], batch["instance_classes"]):
            try:
                image = decode_image(storage.read_bytes(str(uri)), max_pixels=self.max_pixels)
                if self.model == "deeplab":
                    label = codecs.decode_label_png(storage.read_bytes(str(semantic_uri)))
                else:
                    ids = codecs.decode_label_png(storage.read_bytes(str(instance_uri)))
                    masks, labels = instance_masks(ids, {int(k): v for k, v in json.loads(str(classes)).items()})
                    label = ids
            except (ImageDecodeError, OSError, ValueError) as err:
                log.warning("skipping %s in segmenter training: %s", uri, err)
                continue
            if label.shape != image.shape[:2]:
                log.warning("skipping %s: labels %s do not match the image %s", uri, label.shape, image.shape[:2])
                continue
            if self.model == "deeplab":
                x, target = semantic_train_sample(image, label, self.rng, base_size=self.base, crop_size=self.crop)
                out["image"].append(x)
                out["target"].append(target)
            else:
                x, masks, boxes = instance_train_sample(image, masks, self.rng)
                out["image"].append(x)
                out["masks"].append(masks)
                out["boxes"].append(boxes)
                out["labels"].append(labels)
        if self.model == "deeplab":
            if not out["image"]:
                return {"image": np.zeros((0, 3, self.crop, self.crop), np.float32),
                        "target": np.zeros((0, self.crop, self.crop), np.int64)}
            return {"image": np.stack(out["image"]), "target": np.stack(out["target"])}
        return {k: _objects(v) for k, v in out.items()}


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _detection_batches(shard, batch_size: int, seed: int, device: torch.device):
    """Mask R-CNN batches: lists of images and target dicts (images differ in size)."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed):
        images = [torch.as_tensor(x, device=device) for x in batch["image"]]
        targets = [{"boxes": torch.as_tensor(b, device=device).reshape(-1, 4),
                    "labels": torch.as_tensor(np.asarray(c, np.int64), device=device),
                    "masks": torch.as_tensor(np.asarray(m, np.uint8), device=device)}
                   for b, c, m in zip(batch["boxes"], batch["labels"], batch["masks"])]
        yield {"image": images, "targets": targets}


def train_segmenter_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train per-worker loop. ``config``: the ``segmenter`` section plus num_classes, max_step."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(config["seed"])
    init = config["backbone_init"]
    source = init if init in ("none", "imagenet") else io.BytesIO(storage.read_bytes(init))
    net = build_segmenter(config["model"], config["num_classes"], backbone_init=source,
                          min_size=config["min_size"], max_size=config["max_size"])
    optimizer = common.make_optimizer([([p for p in net.parameters() if p.requires_grad], config["lr"])],
                                      config["weight_decay"], config["optimizer"], config["momentum"])
    if config["model"] == "deeplab":
        def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            with common.autocast(batch["image"].device, config["bf16"]):
                logits = model(batch["image"])["out"]
            return F.cross_entropy(logits.float(), batch["target"], ignore_index=255)
        return common.fit_epochs(f"train_{config['model']}", net, optimizer, config, loss_fn)

    def detection_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        with common.autocast(batch["image"][0].device, config["bf16"]):
            losses = model(batch["image"], batch["targets"])
        return sum(v.float() for v in losses.values())

    return common.fit_epochs(f"train_{config['model']}", net, optimizer, config, detection_loss,
                             batches=_detection_batches)


def train_segmenter(cfg, table_ref, num_images: int, classes: list[str], *, name: str, model_uri: str) -> dict[str, Any]:
    """Train ``segmenter.model`` on the rows behind ``table_ref`` and export it to ``model_uri``."""
    import ray.data

    section = cfg.segmenter
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers,
                                                       drop_last=section.model == "deeplab")
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    loop_config = {**vars(section), "num_classes": len(classes), "max_step": max_step, "seed": cfg.run.seed,
                   "poly_power": 0.9, "drop_last": section.model == "deeplab"}  # BatchNorm: no batch of one
    data = dataset(table_ref, 8).randomize_block_order().map_batches(
        SegmenterBatch, fn_constructor_kwargs={"model": section.model, "base_size": section.base_size,
                                               "crop_size": section.crop_size, "max_pixels": cfg.data.max_pixels},
        batch_size=4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5)
    result = common.run_trainer(train_segmenter_loop, loop_config, {"train": data}, root=cfg.run.root, name=name,
                                num_workers=section.num_workers, use_gpu=section.use_gpu,
                                cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures)
    return common.export_model(result, model_uri, {"network": section.model, "classes": classes,
                                                   "config": vars(section), "num_images": num_images})


def load_segmenter(model_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An exported segmenter (eval mode) and its metadata."""
    meta = json.loads(storage.read_text(model_uri + ".json"))
    section = meta["config"]
    net = build_segmenter(meta["network"], len(meta["classes"]), min_size=section["min_size"],
                          max_size=section["max_size"])
    net.load_state_dict(common.load_exported(model_uri), strict=True)
    return net.eval(), meta


def model_file(root: str, model: str, labels: str) -> str:
    return storage.join(root, "models", f"{model}-{labels}", "model.pt")

