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
from pipeline.train import common, inputs

log = logging.getLogger(__name__)


def multi_hot(labels: list[str], classes: list[str]) -> np.ndarray:
    """float32 [C]: 1 for each tagged class."""
    target = np.zeros(len(classes), np.float32)
    index = {name: i for i, name in enumerate(classes)}
    for name in labels:
        target[index[name]] = 1.0
    return target


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


class CamSamples:
    """Sample maker (pipeline.train.inputs) of the CAM network: rows (uri, target) -> augmented
    crops. Undecodable images are left out here (the probe before training quarantines them)."""

    decoded_keys = sample_keys = ("image", "target")

    def __init__(self, *, resize_long: list[int], crop: int, max_pixels: int):
        self.resize_long, self.crop, self.max_pixels = tuple(resize_long), crop, max_pixels

    def decode(self, row: dict[str, Any]) -> dict[str, np.ndarray] | None:
        try:
            image = decode_image(storage.read_bytes(str(row["uri"])), max_pixels=self.max_pixels)
        except (ImageDecodeError, OSError) as err:
            log.warning("skipping %s in CAM training: %s", row["uri"], err)
            return None
        return {"image": image, "target": np.asarray(row["target"], np.float32)}

    def augment(self, decoded: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image": cam_train_sample(np.asarray(decoded["image"]), rng, resize_long=self.resize_long,
                                          crop=self.crop), "target": decoded["target"]}

    def collate(self, rows: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
        return {"image": inputs.stack(rows, "image", device, np.float32),
                "target": inputs.stack(rows, "target", device, np.float32)}


def cam_samples(config: dict[str, Any]) -> CamSamples:
    return CamSamples(resize_long=config["resize_long"], crop=config["crop_size"], max_pixels=config["max_pixels"])


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
            # Rank 0 scores every held-out image (at most eval.max_classification_images, decoded
            # here); every rank gets its score, so every rank takes the same stop decision.
            import torch.distributed as dist

            device = ray.train.torch.get_device()
            value = torch.zeros(1, dtype=torch.float64, device=device)
            if ray.train.get_context().get_world_rank() == 0:
                batches = held_out_batches(config["held_out_rows"], config["crop_size"], config["max_pixels"])
                value[0] = held_out_map(common.unwrap(net), batches, device)[0]
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(value, src=0)
            return float(value[0])

    maker = cam_samples(config)

    def batches(shard, batch_size: int, seed: int, device: torch.device):
        return inputs.augmented_batches(maker, shard, batch_size, seed, device, decoded=config["decode_once"])

    return common.fit_epochs("train_cam", model, optimizer, config, loss_fn, score=score, batches=batches)


def held_out_batches(rows: list[dict[str, Any]], size: int, max_pixels: int):
    """Batches {"image", "target"} of held-out rows (uri, target), fitted by :func:`held_out_input`;
    images that do not decode are left out (the CAM stage quarantines them)."""
    images, targets = [], []
    for row in rows:
        try:
            images.append(held_out_input(decode_image(storage.read_bytes(row["uri"]), max_pixels=max_pixels), size))
        except (ImageDecodeError, OSError):
            continue
        targets.append(np.asarray(row["target"], np.float32))
        if len(images) == 8:
            yield {"image": np.stack(images), "target": np.stack(targets)}
            images, targets = [], []
    if images:
        yield {"image": np.stack(images), "target": np.stack(targets)}


def train_cam(cfg: Config, table_ref, num_images: int, classes: list[str], *, name: str = "cam",
              held_out_rows: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """Train on the ``num_images`` rows (uri, target) behind ``table_ref`` (plan.cam_training_rows)
    and export ``<root>/models/cam/model.pt``; with ``train_cam.select_best``, every epoch is scored
    on ``held_out_rows`` (uri, target) and the best one exported.

    Reruns resume from the latest checkpoint of the run named ``name`` under ``<root>/models``.
    """
    section = cfg.train_cam
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers)
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    decode_once = inputs.decodes_once(num_images, cfg.run.decode_once_max_images)
    loop_config = {**vars(section), "num_classes": len(classes), "max_step": max_step, "seed": cfg.run.seed,
                   "held_out_rows": list(held_out_rows), "max_pixels": cfg.data.max_pixels, "decode_once": decode_once}
    data = inputs.training_dataset(table_ref, cam_samples(loop_config), decode_once=decode_once)
    result = common.run_trainer(
        train_cam_loop, loop_config, {"train": data}, root=cfg.run.root,
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
    batches = list(held_out_batches([{"uri": r["uri"], "target": multi_hot(r["labels"], classes)} for r in rows],
                                    size, max_pixels))
    if not batches:
        return None
    result, count = held_out_map(net, batches, torch.device("cpu"))
    target = np.concatenate([b["target"] for b in batches])
    return {"images": count, "map": result, "chance": float(np.mean([t.mean() for t in target.T if t.any()]))}
