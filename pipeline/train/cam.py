"""Train the CAM network with Ray Train: decode + augment on Ray Data CPU workers, DDP trainer.

The paper's recipe (DESIGN §4): multilabel soft-margin loss, SGD without momentum, backbone lr and
10x on the classifier, weight decay 1e-4, polynomial decay (power 0.9). For runs without
pretrained weights (``from_scratch``), ``optimizer: adamw``, ``select_best`` (export the epoch with
the best held-out mAP) and ``patience`` (stop on a plateau) make a from-scratch network learn.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.transforms import cam_train_sample, held_out_input
from pipeline.io import layout, storage
from pipeline.models.cam_net import build_cam_net
from pipeline.stages.common import dataset
from pipeline.train import common

log = logging.getLogger(__name__)


def multi_hot(labels: list[str], classes: list[str]) -> np.ndarray:
    """float32 [C]: 1 for each tagged class."""
    target = np.zeros(len(classes), np.float32)
    index = {name: i for i, name in enumerate(classes)}
    for name in labels:
        target[index[name]] = 1.0
    return target


class HeldOutBatch:
    """Ray Data map: rows (uri, target) -> the fixed-size inputs of :func:`held_out_input`."""

    def __init__(self, *, size: int, max_pixels: int):
        self.size, self.max_pixels = size, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, targets = [], []
        for uri, target in zip(batch["uri"], batch["target"]):
            try:
                images.append(held_out_input(decode_image(storage.read_bytes(str(uri)), max_pixels=self.max_pixels),
                                             self.size))
                targets.append(np.asarray(target, np.float32))
            except (ImageDecodeError, OSError):
                continue  # quarantined by the CAM stage
        if not images:
            return {"image": np.zeros((0, 3, self.size, self.size), np.float32),
                    "target": np.zeros((0, len(batch["target"][0]) if len(batch["target"]) else 0), np.float32)}
        return {"image": np.stack(images), "target": np.stack(targets)}


@torch.no_grad()
def held_out_map(model: torch.nn.Module, batches, device: torch.device) -> tuple[float, int]:
    """(classification mAP, images) of ``model`` over batches {"image", "target"} (eval mode)."""
    from pipeline.algorithms.metrics import classification_map

    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in batches:
        scores.append(torch.sigmoid(model(torch.as_tensor(batch["image"], device=device)).float()).cpu().numpy())
        targets.append(np.asarray(batch["target"].cpu() if torch.is_tensor(batch["target"]) else batch["target"]))
    model.train(was_training)
    if not scores:
        return float("nan"), 0
    targets_all = np.concatenate(targets)
    return classification_map(np.concatenate(scores), targets_all)["mean"], len(targets_all)


class CamTrainBatch:
    """Ray Data map: rows (uri, target) -> augmented crops. Undecodable images are dropped here
    (and quarantined by the CAM inference stage, which decodes every image)."""

    def __init__(self, *, resize_long: list[int], crop: int, max_pixels: int, seed: int | None = None):
        self.resize_long, self.crop, self.max_pixels = tuple(resize_long), crop, max_pixels
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, targets = [], []
        for uri, target in zip(batch["uri"], batch["target"]):
            try:
                image = decode_image(storage.read_bytes(str(uri)), max_pixels=self.max_pixels)
            except (ImageDecodeError, OSError) as err:
                log.warning("skipping %s in CAM training: %s", uri, err)
                continue
            images.append(cam_train_sample(image, self.rng, resize_long=self.resize_long, crop=self.crop))
            targets.append(np.asarray(target, np.float32))
        if not images:
            return {"image": np.zeros((0, 3, self.crop, self.crop), np.float32),
                    "target": np.zeros((0, len(batch["target"][0]) if len(batch["target"]) else 0), np.float32)}
        return {"image": np.stack(images), "target": np.stack(targets)}


def train_cam_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train per-worker loop. ``config``: the ``train_cam`` section plus num_classes, max_step."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(config["seed"])  # same initial weights on every rank and every run
    model = build_cam_net(num_classes=config["num_classes"], depth=config["depth"],
                          backbone_init=backbone_source(config["backbone_init"]),
                          from_scratch=config["from_scratch"])
    backbone_params, classifier_params = model.parameter_groups()
    optimizer = common.make_optimizer([(backbone_params, config["lr"]), (classifier_params, 10 * config["lr"])],
                                      config["weight_decay"], config["optimizer"])

    def loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with common.autocast(batch["image"].device, config["bf16"]):
            logits = net(batch["image"])
        return F.multilabel_soft_margin_loss(logits.float(), batch["target"])

    score = None
    if config["select_best"]:
        import ray.train
        import ray.train.torch

        def score(net: torch.nn.Module) -> float:
            # Every rank sees every held-out image (the dataset is not split): the same score
            # everywhere, so every rank takes the same stop decision.
            batches = ray.train.get_dataset_shard("held_out").iter_torch_batches(
                batch_size=8, device=ray.train.torch.get_device())
            return held_out_map(net, batches, ray.train.torch.get_device())[0]

    return common.fit_epochs("train_cam", model, optimizer, config, loss_fn, score=score)


def cam_train_dataset(table_ref, cfg: Config):
    """Ray Dataset of augmented training crops from a table (uri, target) made by a planning task."""
    import ray.data

    section = cfg.train_cam
    return dataset(table_ref, 16).randomize_block_order(seed=cfg.run.seed).map_batches(
        CamTrainBatch, fn_constructor_kwargs={"resize_long": section.resize_long, "crop": section.crop_size,
                                              "max_pixels": cfg.data.max_pixels},
        batch_size=8, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.5)


def held_out_dataset(table_ref, cfg: Config):
    """Ray Dataset of the held-out images (uri, target) as fixed-size inputs."""
    import ray.data

    return dataset(table_ref, 16).map_batches(
        HeldOutBatch, fn_constructor_kwargs={"size": cfg.train_cam.crop_size, "max_pixels": cfg.data.max_pixels},
        batch_size=8, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), num_cpus=0.25)


def train_cam(cfg: Config, table_ref, num_images: int, classes: list[str], *, name: str = "cam",
              held_out_ref=None) -> dict[str, Any]:
    """Train on the ``num_images`` rows (uri, target) behind ``table_ref`` (plan.cam_training_rows)
    and export ``<root>/models/cam/model.pt``; with ``train_cam.select_best``, every epoch is scored
    on the held-out rows behind ``held_out_ref`` and the best one exported.

    Reruns resume from the latest checkpoint of the run named ``name`` under ``<root>/models``.
    """
    section = cfg.train_cam
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers)
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    loop_config = {**vars(section), "num_classes": len(classes), "max_step": max_step, "seed": cfg.run.seed}
    datasets = {"train": cam_train_dataset(table_ref, cfg)}
    if section.select_best:
        datasets["held_out"] = held_out_dataset(held_out_ref, cfg)
    result = common.run_trainer(
        train_cam_loop, loop_config, datasets, root=cfg.run.root,
        name=name, num_workers=section.num_workers, use_gpu=section.use_gpu,
        cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures)
    return common.export_model(result, layout.model_file(cfg.run.root, "cam"),
                               {"network": "cam", "classes": classes, "config": vars(section),
                                "num_images": num_images})


def backbone_source(init: str):
    """'none' / 'imagenet' as they are; any other value is a weights file URI, opened here."""
    if init in ("none", "imagenet"):
        return init
    return io.BytesIO(storage.read_bytes(init))


def held_out_quality(root: str, manifest_dir: str, classes: list[str], *, size: int, max_pixels: int,
                     max_images: int) -> dict[str, Any] | None:
    """Task: :func:`classifier_quality` on the manifest's held-out images (at most ``max_images``)."""
    from pipeline.stages.plan import cam_training_rows

    table, _, _ = cam_training_rows(manifest_dir, classes, held_out=True, limit=max_images)
    return classifier_quality(root, table.select(["uri", "labels"]).to_pylist(), classes, size=size,
                              max_pixels=max_pixels)


def classifier_quality(root: str, rows: list[dict[str, Any]], classes: list[str], *, size: int,
                       max_pixels: int) -> dict[str, Any] | None:
    """Classification mAP of the exported CAM network on held-out rows (uri, labels), the images
    fitted into ``size`` x ``size`` as in training's per-epoch scoring; None without images."""
    from pipeline.train.common import load_trained

    net = load_trained(root, "cam", num_classes=len(classes))
    images, targets = [], []
    for row in rows:
        try:
            images.append(held_out_input(decode_image(storage.read_bytes(row["uri"]), max_pixels=max_pixels), size))
        except (ImageDecodeError, OSError):
            continue  # quarantined by the CAM stage
        targets.append(multi_hot(row["labels"], classes))
    if not images:
        return None
    batches = [{"image": np.stack(images[i:i + 8]), "target": np.stack(targets[i:i + 8])}
               for i in range(0, len(images), 8)]
    result, count = held_out_map(net, batches, torch.device("cpu"))
    target = np.stack(targets)
    return {"images": count, "map": result, "chance": float(np.mean([t.mean() for t in target.T if t.any()]))}
