"""Train the CAM network with Ray Train: decode + augment on Ray Data CPU workers, DDP trainer.

The paper's recipe (DESIGN §4): multilabel soft-margin loss, SGD without momentum, backbone lr and
10x on the classifier, weight decay 1e-4, polynomial decay (power 0.9).
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
from pipeline.data.transforms import cam_train_sample
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
    optimizer = common.make_sgd([(backbone_params, config["lr"]), (classifier_params, 10 * config["lr"])],
                                config["weight_decay"])

    def loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with common.autocast(batch["image"].device, config["bf16"]):
            logits = net(batch["image"])
        return F.multilabel_soft_margin_loss(logits.float(), batch["target"])

    return common.fit_epochs("train_cam", model, optimizer, config, loss_fn)


def cam_train_dataset(table_ref, cfg: Config):
    """Ray Dataset of augmented training crops from a table (uri, target) made by a planning task."""
    import ray.data

    section = cfg.train_cam
    return dataset(table_ref, 16).randomize_block_order(seed=cfg.run.seed).map_batches(
        CamTrainBatch, fn_constructor_kwargs={"resize_long": section.resize_long, "crop": section.crop_size,
                                              "max_pixels": cfg.data.max_pixels},
        batch_size=8, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        num_cpus=0.5)


def train_cam(cfg: Config, table_ref, num_images: int, classes: list[str], *, name: str = "cam") -> dict[str, Any]:
    """Train on the ``num_images`` rows (uri, target) behind ``table_ref`` (plan.cam_training_rows)
    and export ``<root>/models/cam/model.pt``.

    Reruns resume from the latest checkpoint of the run named ``name`` under ``<root>/models``.
    """
    section = cfg.train_cam
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers)
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    loop_config = {**vars(section), "num_classes": len(classes), "max_step": max_step, "seed": cfg.run.seed}
    result = common.run_trainer(
        train_cam_loop, loop_config, {"train": cam_train_dataset(table_ref, cfg)}, root=cfg.run.root,
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


@torch.no_grad()
def predict_scores(model: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """Sigmoid class scores float32 [N, C] of full images (uint8 [H, W, 3] each) at scale 1."""
    from pipeline.data.transforms import normalize

    model.eval()
    scores = [torch.sigmoid(model(torch.from_numpy(normalize(image))[None]))[0].numpy() for image in images]
    return np.stack(scores) if scores else np.zeros((0, 0), np.float32)
