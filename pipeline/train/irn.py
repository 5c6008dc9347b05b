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

from pipeline.algorithms.losses import irn_losses
from pipeline.algorithms.pairs import downsample_labels, relation_pair_labels
from pipeline.config import Config
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.transforms import irn_train_sample, normalize
from pipeline.io import codecs, layout, storage
from pipeline.models.irnet import build_irnet
from pipeline.stages.common import dataset
from pipeline.train import common
from pipeline.train.cam import backbone_source

log = logging.getLogger(__name__)


class IrnTrainBatch:
    """Ray Data map: rows (uri, relation_uri) -> augmented crops and stride-4 relation maps.

    With ``augment=False`` it yields the plain normalised image padded/cropped at the top left,
    for measuring the mean displacement.
    """

    def __init__(self, *, rescale: list[float], crop: int, max_pixels: int, augment: bool = True,
                 seed: int | None = None):
        self.rescale, self.crop, self.max_pixels, self.augment = tuple(rescale), crop, max_pixels, augment
        self.rng = np.random.default_rng(seed)

    def _plain(self, image: np.ndarray, relation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        norm = normalize(image[: self.crop, : self.crop])
        relation = relation[: self.crop, : self.crop]
        out_image = np.zeros((3, self.crop, self.crop), np.float32)
        out_label = np.full((self.crop, self.crop), 255, np.uint8)
        out_image[:, : norm.shape[1], : norm.shape[2]] = norm
        out_label[: relation.shape[0], : relation.shape[1]] = relation
        return out_image, out_label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, relations = [], []
        for uri, relation_uri in zip(batch["uri"], batch["relation_uri"]):
            try:
                image = decode_image(storage.read_bytes(str(uri)), max_pixels=self.max_pixels)
                relation = codecs.decode_label_png(storage.read_bytes(str(relation_uri)))
            except (ImageDecodeError, OSError, ValueError) as err:
                log.warning("skipping %s in IRNet training: %s", uri, err)
                continue
            if relation.shape != image.shape[:2]:
                log.warning("skipping %s: relation map %s does not match image %s", uri,
                            relation.shape, image.shape[:2])
                continue
            if self.augment:
                crop, label = irn_train_sample(image, relation, self.rng, rescale=self.rescale, crop=self.crop)
            else:
                crop, label = self._plain(image, relation)
            images.append(crop)
            relations.append(np.ascontiguousarray(downsample_labels(label)))
        grid = -(-self.crop // 4)
        if not images:
            return {"image": np.zeros((0, 3, self.crop, self.crop), np.float32),
                    "relation": np.zeros((0, grid, grid), np.uint8)}
        return {"image": np.stack(images), "relation": np.stack(relations).astype(np.uint8)}


def _pair_labels(relations: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, h, w] stride-4 relation maps -> three float [B, P, h, w] pair-label masks."""
    per_image = [relation_pair_labels(r, radius, interior=True) for r in relations]
    return tuple(torch.stack([labels[k] for labels in per_image]).float() for k in range(3))


def _mean_displacement(model: torch.nn.Module, shard, device: torch.device, batch_size: int,
                       bf16: bool) -> torch.Tensor:
    """Mean raw displacement [2] over this worker's images, averaged over workers."""
    import torch.distributed as dist

    total, count = torch.zeros(2, dtype=torch.float64, device=device), torch.zeros(1, dtype=torch.float64, device=device)
    model.eval()  # the mean displacement is still zero: raw output, BatchNorm on its statistics
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
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
        model = build_irnet(depth=config["depth"], cam_state_dict=common.load_exported(config["cam_model_uri"]),
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
        return irn_losses(out.boundary_logits.float(), out.displacement.float(), bg, fg, neg, radius=radius)["total"]

    def finish(net: torch.nn.Module) -> dict[str, Any]:
        world = ray.train.get_context().get_world_size()
        mean = _mean_displacement(net, ray.train.get_dataset_shard("mean"), ray.train.torch.get_device(),
                                  max(1, config["batch_size"] // world), config["bf16"])
        common.unwrap(net).set_mean_displacement(mean)
        return {"mean_displacement": mean.tolist()}

    return common.fit_epochs("train_irn", model, optimizer, config, loss_fn, finish)


def irn_train_datasets(table_ref, cfg: Config) -> dict:
    """Ray Datasets 'train' (augmented) and 'mean' (plain) from a table (uri, relation_uri) made
    by a planning task."""
    import ray.data

    section = cfg.train_irn
    source = dataset(table_ref, 16)
    # 0.25 CPU per decode actor: with the trainer's CPU, both datasets' pools fit on 2 cores.
    kwargs = {"batch_size": 8, "batch_format": "numpy", "num_cpus": 0.25,
              "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=2)}
    common_args = {"rescale": section.rescale, "crop": section.crop_size, "max_pixels": cfg.data.max_pixels}
    return {
        "train": source.randomize_block_order().map_batches(
            IrnTrainBatch, fn_constructor_kwargs={**common_args, "augment": True}, **kwargs),
        "mean": source.map_batches(IrnTrainBatch, fn_constructor_kwargs={**common_args, "augment": False},
                                   **kwargs),
    }


def train_irn(cfg: Config, table_ref, num_images: int, *, name: str = "irn") -> dict[str, Any]:
    """Train on the ``num_images`` rows (uri, relation_uri) behind ``table_ref``
    (plan.irn_training_rows) and export ``<root>/models/irn/model.pt``."""
    section = cfg.train_irn
    max_step = section.epochs * common.steps_per_epoch(num_images, section.batch_size, section.num_workers)
    if section.max_steps is not None:
        max_step = min(max_step, section.max_steps)
    loop_config = {**vars(section), "max_step": max_step, "seed": cfg.run.seed,
                   "cam_model_uri": layout.model_file(cfg.run.root, "cam")}
    result = common.run_trainer(
        train_irn_loop, loop_config, irn_train_datasets(table_ref, cfg), root=cfg.run.root, name=name,
        num_workers=section.num_workers, use_gpu=section.use_gpu,
        cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures)
    return common.export_model(result, layout.model_file(cfg.run.root, "irn"),
                               {"network": "irn", "config": vars(section), "num_images": num_images})
