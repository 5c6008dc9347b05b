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

from pipeline import ledger, plan, tasks
from pipeline.algorithms.metrics import classification_map
from pipeline.config import Config
from pipeline.data.classes import Vocabulary
from pipeline.data.images import UNREADABLE, read_inputs, unreadable_reason
from pipeline.data.transforms import cam_train_sample, held_out_input
from pipeline.io import layout, storage
from pipeline.models.cam_net import build_cam_net
from pipeline.models.store import load_trained
from pipeline.train import common, inputs

log = logging.getLogger(__name__)


@torch.no_grad()
def held_out_map(model: torch.nn.Module, batches, device: torch.device) -> tuple[float, int]:
    """(classification mAP, images) of ``model`` over batches {"image", "target"} (eval mode)."""
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
            image, _ = read_inputs(row["uri"], max_pixels=self.max_pixels)
        except UNREADABLE as err:
            log.warning("skipping %s in CAM training: %s", row["uri"], unreadable_reason(err))
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
            images.append(held_out_input(read_inputs(row["uri"], max_pixels=max_pixels)[0], size))
        except UNREADABLE:
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
    table, _, _ = plan.cam_training_rows(manifest_dir, classes, held_out=True, limit=max_images)
    return classifier_quality(root, table.select(["uri", "labels"]).to_pylist(), classes, size=size,
                              max_pixels=max_pixels)


def classifier_quality(root: str, rows: list[dict[str, Any]], classes: list[str], *, size: int,
                       max_pixels: int) -> dict[str, Any] | None:
    """Classification mAP of the exported CAM network on held-out rows (uri, labels), the images
    fitted into ``size`` x ``size`` as in training's per-epoch scoring; None without images."""
    net = load_trained(root, "cam", num_classes=len(classes))
    targets = Vocabulary(classes).multi_hot([r["labels"] for r in rows])
    batches = list(held_out_batches([{"uri": r["uri"], "target": t} for r, t in zip(rows, targets)],
                                    size, max_pixels))
    if not batches:
        return None
    result, count = held_out_map(net, batches, torch.device("cpu"))
    target = np.concatenate([b["target"] for b in batches])
    return {"images": count, "map": result, "chance": float(np.mean([t.mean() for t in target.T if t.any()]))}


class QualityGateError(RuntimeError):
    """The CAM network is too weak to label with: the run stops before it publishes anything."""


def stage_train_cam(run: ledger.Run) -> dict[str, Any]:
    if run.cfg.cams.source:
        return {"_skipped": True, "reason": "cams.source gives the CAMs"}
    key = ledger.train_cam_key(run.cfg, run.classes)

    def train(name: str) -> dict[str, Any]:
        table_ref, count_ref, chance_ref = tasks.run_task(plan.cam_training_rows, run.manifest_dir, run.classes,
                                                           num_returns=3, num_cpus=run.cfg.run.io_cpus)
        held_out: list[dict[str, Any]] = []
        if run.cfg.train_cam.select_best:  # at most eval.max_classification_images rows: small
            held_out = tasks.get(tasks.run_task(
                plan.cam_training_rows, run.manifest_dir, run.classes, held_out=True,
                limit=run.cfg.eval.max_classification_images, num_returns=3, num_cpus=run.cfg.run.io_cpus)[0]
            ).select(["uri", "target"]).to_pylist()
        run.state.update_stage("train_cam", chance_loss=tasks.get(chance_ref))
        return train_cam(run.cfg, table_ref, tasks.get(count_ref), run.classes, name=name, held_out_rows=held_out)

    counts = common.train_network(run, "cam", key, train)
    quality = held_out_record(run)
    if quality:
        counts["held_out_map"] = quality.get("map")
    return counts


def held_out_record(run: ledger.Run) -> dict[str, Any] | None:
    """The CAM network's classification mAP on the held-out images (recorded in run.json per
    model file, so it is measured once per model)."""
    model = layout.model_file(run.root, "cam")
    if not storage.exists(model):
        return None
    digest = ledger.file_fingerprint(model)
    recorded = ledger.current_held_out(run.state, digest)
    if recorded is not None:
        return recorded
    cfg = run.cfg
    quality = tasks.get(tasks.run_task(held_out_quality, run.root, run.manifest_dir, run.classes,
                                       size=cfg.train_cam.crop_size, max_pixels=cfg.data.max_pixels,
                                       max_images=cfg.eval.max_classification_images, num_cpus=1))
    return ledger.record_held_out(run.state, digest, quality)


def cam_skill(held_out: dict[str, Any]) -> float:
    """(mAP - chance) / (1 - chance) of a held-out measurement: 0 at chance, 1 when perfect."""
    chance = held_out["chance"]
    return (held_out["map"] - chance) / (1 - chance) if chance < 1 else 1.0


def quality_gate(run: ledger.Run) -> None:
    """Stop before anything is published when the CAM network did not learn well enough: its
    held-out mAP below ``run.min_cam_map`` or its skill over chance below ``run.min_cam_skill``,
    or its final training loss near the chance loss."""
    gate = run.cfg.run.min_cam_map
    stage = run.state.stage("train_cam")
    if gate <= 0 or run.cfg.cams.source or not stage.get("held_out"):
        return
    held_out, problems = stage["held_out"], []
    if not held_out.get("images"):
        log.warning("quality gate: no held-out image to measure the CAM network on; not checked")
        return
    measured = (f"the CAM classifier's held-out mAP is {held_out['map']:.3f} on {held_out['images']} images "
                f"(chance {held_out['chance']:.3f})")
    skill = cam_skill(held_out)
    if held_out["map"] < gate:
        problems.append(f"{measured}, below run.min_cam_map {gate:.2f}")
    elif skill < run.cfg.run.min_cam_skill:
        problems.append(f"{measured}: {skill:.2f} of the way from chance to perfect, below run.min_cam_skill "
                        f"{run.cfg.run.min_cam_skill:.2f}; its CAMs would localise poorly")
    loss, chance = (stage.get("counts") or {}).get("final_loss"), stage.get("chance_loss")
    if loss is not None and chance and loss > CHANCE_LOSS_SHARE * chance:
        problems.append(f"its final training loss {loss:.3f} is within {100 - 100 * CHANCE_LOSS_SHARE:.0f}% of "
                        f"chance ({chance:.3f})")
    if problems:
        raise QualityGateError(
            "quality gate: " + "; ".join(problems) + ". Nothing was published (LATEST is unchanged); what was "
            "computed is kept. Try: more epochs or images; with no pretrained weights "
            "train_cam.from_scratch=true with optimizer=adamw and select_best=true; or CAMs from another method "
            "(cams.source). To label anyway: --set run.min_cam_map=0.")


CHANCE_LOSS_SHARE = 0.95  # a final loss above 95% of the chance loss: the network learnt (almost) nothing
