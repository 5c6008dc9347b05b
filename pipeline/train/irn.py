"""Train IRNet with Ray Train from images and mined relation labels (paper Sec. 4.3).

The backbone is frozen and starts from ImageNet weights by default, as in the official code
(``train_irn.backbone_init``; ``cam`` takes the trained CAM network's backbone instead, for runs
without pretrained weights, and ``from_scratch`` trains it too). The boundary branch trains at
lr, the displacement branch at 10x lr, with the IRNet loss of ``pipeline.algorithms`` on all
pairs within ``radius`` (10) of the stride-4 relation labels. After training, the mean
displacement over the IRNet training images is measured and stored in the model.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline import ledger, plan, tasks
from pipeline.algorithms.losses import irn_losses
from pipeline.algorithms.pairs import IGNORE_LABEL, downsample_labels, instance_relation_map, relation_pair_labels
from pipeline.config import Config
from pipeline.data.images import UNREADABLE, read_inputs, read_label, unreadable_reason
from pipeline.data.transforms import irn_train_sample, normalize
from pipeline.io import layout
from pipeline.models.irnet import build_irnet
from pipeline.models.store import load_exported
from pipeline.train import common, inputs
from pipeline.train.cam import backbone_source

log = logging.getLogger(__name__)


class IrnSamples:
    """Sample maker (pipeline.train.inputs) of IRNet: rows (uri, relation_uri, instance_uri) ->
    augmented crops, stride-4 relation maps and exact displacement targets; :meth:`plain` gives
    the normalised image padded/cropped at the top left, for measuring the mean displacement.

    A row with an ``instance_uri`` is an image people labelled (plan.irn_training_rows): its
    relation map is the correction's semantic PNG with its instance ids in place of class ids
    (algorithms.pairs.instance_relation_map: exact pairs, touching instances apart), and its
    target is each pixel's offset to its instance's centroid in grid units (NaN elsewhere, and on
    every other image)."""

    decoded_keys = ("image", "relation", "exact")
    sample_keys = ("image", "relation", "target")

    def __init__(self, *, rescale: list[float], crop: int, max_pixels: int):
        self.rescale, self.crop, self.max_pixels = tuple(rescale), crop, max_pixels

    def decode(self, row: dict[str, Any]) -> dict[str, np.ndarray] | None:
        uri, instance_uri = row["uri"], row.get("instance_uri")
        instance_uri = instance_uri if isinstance(instance_uri, str) else None  # null: Ray gives None or NaN
        try:
            image, relation = read_inputs(uri, row["relation_uri"], max_pixels=self.max_pixels,
                                          label_name="relation map")
            if instance_uri:
                instances = read_label(instance_uri)
                if instances.shape != relation.shape:
                    raise ValueError(f"instance map {instances.shape} does not match the image {relation.shape}")
                if int(instances.max(initial=0)) >= IGNORE_LABEL:  # a uint8 relation map holds ids 1..254
                    log.warning("%s: the corrected instances past id %d are not trained on", uri, IGNORE_LABEL - 1)
                relation = instance_relation_map(relation, instances)
        except UNREADABLE as err:
            log.warning("skipping %s in IRNet training: %s", uri, unreadable_reason(err))
            return None
        return {"image": image, "relation": relation, "exact": np.array([bool(instance_uri)])}

    def _no_target(self) -> np.ndarray:
        side = -(-self.crop // 4)
        return np.full((2, side, side), np.nan, np.float32)

    def augment(self, decoded: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        exact = bool(np.asarray(decoded["exact"])[0])
        crop, label, *offsets = irn_train_sample(np.asarray(decoded["image"]), np.asarray(decoded["relation"]), rng,
                                                 rescale=self.rescale, crop=self.crop, exact=exact)
        target = downsample_labels(offsets[0]) / 4 if exact else self._no_target()  # pixels -> grid units
        return {"image": crop, "relation": np.ascontiguousarray(downsample_labels(label)),
                "target": np.ascontiguousarray(target, np.float32)}

    def plain(self, decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image, relation = np.asarray(decoded["image"]), np.asarray(decoded["relation"])
        norm = normalize(image[: self.crop, : self.crop])
        relation = relation[: self.crop, : self.crop]
        out_image = np.zeros((3, self.crop, self.crop), np.float32)
        out_label = np.full((self.crop, self.crop), 255, np.uint8)
        out_image[:, : norm.shape[1], : norm.shape[2]] = norm
        out_label[: relation.shape[0], : relation.shape[1]] = relation
        return {"image": out_image, "relation": np.ascontiguousarray(downsample_labels(out_label)),
                "target": self._no_target()}

    def collate(self, rows: list[dict[str, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
        return {"image": inputs.stack(rows, "image", device, np.float32),
                "relation": inputs.stack(rows, "relation", device, np.uint8),
                "target": inputs.stack(rows, "target", device, np.float32)}


def irn_samples(config: dict[str, Any]) -> IrnSamples:
    return IrnSamples(rescale=config["rescale"], crop=config["crop_size"], max_pixels=config["max_pixels"])


def _pair_labels(relations: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, h, w] stride-4 relation maps -> three float [B, P, h, w] pair-label masks."""
    per_image = [relation_pair_labels(r, radius, interior=True) for r in relations]
    return tuple(torch.stack([labels[k] for labels in per_image]).float() for k in range(3))


def _mean_displacement(model: torch.nn.Module, batches, device: torch.device, bf16: bool) -> torch.Tensor:
    """Mean raw displacement [2] over this worker's images, averaged over workers."""
    import torch.distributed as dist

    total, count = torch.zeros(2, dtype=torch.float64, device=device), torch.zeros(1, dtype=torch.float64, device=device)
    model.eval()  # the mean displacement is still zero: raw output, BatchNorm on its statistics
    with torch.no_grad():
        for batch in batches:
            with common.autocast(device, bf16):
                displacement = model(batch["image"]).displacement.float()
            total += displacement.sum(dim=(0, 2, 3)).double()
            count += displacement.shape[0] * displacement.shape[2] * displacement.shape[3]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).float().cpu()


def train_irn_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train per-worker loop. ``config``: the ``train_irn`` section plus cam_model_uri, max_step."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(config["seed"])  # same initial branch weights on every rank and every run
    if config["backbone_init"] == "cam":
        model = build_irnet(depth=config["depth"], cam_state_dict=load_exported(config["cam_model_uri"]),
                            from_scratch=config["from_scratch"])
    else:
        model = build_irnet(depth=config["depth"], backbone_init=backbone_source(config["backbone_init"]),
                            from_scratch=config["from_scratch"])
    boundary_params, displacement_params = model.parameter_groups()
    optimizer = common.make_optimizer([(boundary_params, config["lr"]), (displacement_params, 10 * config["lr"])],
                                      config["weight_decay"], config["optimizer"])
    radius = config["radius"]

    def loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        bg, fg, neg = _pair_labels(batch["relation"], radius)
        with common.autocast(batch["image"].device, config["bf16"]):
            out = net(batch["image"])
        return irn_losses(out.boundary_logits.float(), out.displacement.float(), bg, fg, neg, radius=radius,
                          target=batch["target"])["total"]

    maker = irn_samples(config)

    def batches(shard, batch_size: int, seed: int, device: torch.device):
        return inputs.augmented_batches(maker, shard, batch_size, seed, device, decoded=config["decode_once"])

    def finish(net: torch.nn.Module) -> dict[str, Any]:
        world = ray.train.get_context().get_world_size()
        device = ray.train.torch.get_device()
        # Decoded once: the training images themselves, plain; else the streamed 'mean' dataset.
        decoded = config["decode_once"]
        shard = ray.train.get_dataset_shard("train" if decoded else "mean")
        plain = inputs.augmented_batches(maker, shard, max(1, config["batch_size"] // world), config["seed"],
                                         device, decoded=decoded, augment=False)
        mean = _mean_displacement(net, plain, device, config["bf16"])
        common.unwrap(net).set_mean_displacement(mean)
        return {"mean_displacement": mean.tolist()}

    return common.fit_epochs("train_irn", model, optimizer, config, loss_fn, finish, batches=batches)


def irn_train_datasets(table_ref, maker: IrnSamples, *, decode_once: bool) -> dict:
    """Ray Datasets from a table (uri, relation_uri, instance_uri) made by a planning task: 'train' (decoded
    once, or streamed augmented), and when streamed 'mean' (plain inputs)."""
    # 0.25 CPU per decode actor: with the trainer's CPU, both streamed datasets' pools fit on 2 cores.
    if decode_once:
        return {"train": inputs.training_dataset(table_ref, maker, decode_once=True, actor_cpus=0.25)}
    return {"train": inputs.training_dataset(table_ref, maker, decode_once=False, actor_cpus=0.25),
            "mean": inputs.training_dataset(table_ref, maker, decode_once=False, augment=False, actor_cpus=0.25)}


def train_irn(cfg: Config, table_ref, num_images: int, *, name: str = "irn") -> dict[str, Any]:
    """Train on the ``num_images`` rows (uri, relation_uri, instance_uri) behind ``table_ref``
    (plan.irn_training_rows) and export ``<root>/models/irn/model.pt``."""
    section = cfg.train_irn
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers)
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    decode_once = inputs.decodes_once(num_images, cfg.run.decode_once_max_images)
    loop_config = {**vars(section), "max_step": max_step, "seed": cfg.run.seed, "max_pixels": cfg.data.max_pixels,
                   "cam_model_uri": layout.model_file(cfg.run.root, "cam"), "decode_once": decode_once}
    datasets = irn_train_datasets(table_ref, irn_samples(loop_config), decode_once=decode_once)
    result = common.run_trainer(
        train_irn_loop, loop_config, datasets, root=cfg.run.root, name=name,
        num_workers=section.num_workers, use_gpu=section.use_gpu,
        cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures)
    return common.export_model(result, layout.model_file(cfg.run.root, "irn"),
                               {"network": "irn", "config": vars(section), "num_images": num_images})


def stage_train_irn(run: ledger.Run) -> dict[str, Any]:
    cams_key = run.recorded_cams_key()
    # the corrections are read once: the key and the training rows come from the same table, so a
    # correction stored meanwhile is neither trained on under a key without it nor the reverse
    exact_ref = tasks.run_task(plan.training_corrections, run.root, run.manifest_dir, num_cpus=run.cfg.run.io_cpus)
    corrections = tasks.get(tasks.run_task(plan.training_corrections_digest, exact_ref, num_cpus=run.cfg.run.io_cpus))
    key = ledger.train_irn_key(run.cfg, cams_key, corrections)

    def train(name: str) -> dict[str, Any]:
        table_ref, count_ref = tasks.run_task(plan.irn_training_rows, run.root, run.manifest_dir, run.classes,
                                               cams_key, exact_ref, num_returns=2, num_cpus=run.cfg.run.io_cpus)
        return train_irn(run.cfg, table_ref, tasks.get(count_ref), name=name)

    return common.train_network(run, "irn", key, train)
