"""One typed configuration object for the whole run.

Every knob of every stage lives in a dataclass below, with the paper's (and the official code's)
values as defaults. A config is built from YAML (any fsspec URI) plus ``--set section.key=value``
overrides; an unknown key, a value of the wrong type or one outside its valid range (``RANGES``)
fails at once with a message that names the key and says what would be accepted. Before any work,
the jobs also check that every input the config names exists and can be read (``check_inputs``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import yaml

from pipeline.io import storage

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


@dataclass
class DataConfig:
    """Input image set."""

    manifest: str = ""  # Parquet / CSV / JSON Lines manifest URI (required; columns: docs/inputs.md)
    # class names in id order (class 1, 2, ...; 0 is background); empty: sorted union of the manifest labels
    classes: list[str] = field(default_factory=list)
    max_pixels: int = 40_000_000  # larger images are quarantined (decompression-bomb guard)
    # Held out from training to measure the CAM classifier: rows with split 'val'; when no row
    # has one, this share of the images, chosen by a hash of image_id.
    held_out_fraction: float = 0.1


@dataclass
class RunConfig:
    """Where outputs go and how reruns behave."""

    root: str = "runs/default"  # run root, local path or s3://bucket/prefix
    # when to train the networks again: never (reuse the run root's models), always, or auto
    # (when the training config or the classes changed, no model exists, or, for IRNet, the
    # corrections of images it trains on changed)
    retrain: Literal["never", "always", "auto"] = "auto"
    # seeds training (initial weights, augmentation, shuffle order); Ray's scheduling still varies runs
    seed: int = 0
    shard_rows: int = 2000  # images per Parquet shard (CAMs, label rows, instances, quarantine)
    io_cpus: float = 0.25  # CPUs of each decode, planning and shard-writing task
    progress_seconds: float = 10.0  # at most one progress line per stage this often
    # Training sets of at most this many images are decoded once per run and kept in Ray's object
    # store (about 0.5 MB per VOC-sized image); the training workers augment them every epoch and
    # can hold every CPU. Larger sets stream: decoded and augmented by CPU actors every epoch.
    decode_once_max_images: int = 2000
    # Quality gate: below this held-out mAP of the CAM classifier, or below min_cam_skill, or with a
    # final training loss near chance, the run stops before publishing (exit status 3).
    # min_cam_map 0 turns the whole gate off.
    min_cam_map: float = 0.6
    # (mAP - chance) / (1 - chance): how far from chance to perfect the classifier got. Measured
    # (docs/trust.md): 0.61 and 0.74 gave labels of mIoU ~0.3, 0.89 and 0.92 gave 0.46-0.52.
    min_cam_skill: float = 0.8
    # One job per run root: a job holds <root>/_lease.json and renews its heartbeat this often
    lease_heartbeat_seconds: float = 30.0
    # a lease without a heartbeat for this long is taken over by the next job (docs/reliability.md)
    lease_expiry_seconds: float = 600.0


@dataclass
class RayConfig:
    """How to reach Ray. ``address: local`` starts an embedded instance."""

    # auto-local: RAY_ADDRESS if set (as under ray job submit), else an embedded local Ray; local: always
    # embedded; any other value: the address of a running cluster (ray.init)
    address: str = "auto-local"
    num_cpus: int | None = None  # CPUs of an embedded instance (null: the machine's); ignored when joining a cluster
    # GPUs of an embedded instance (null: those Ray detects); ignored when joining a cluster
    num_gpus: int | None = None


@dataclass
class TrainCamConfig:
    """CAM network training (Sec. 3 of the paper; Ray Train)."""

    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth of the CAM network's backbone (the paper: 50)
    # backbone weights to start from: imagenet (torchvision's), none (random) or a weights file URI
    backbone_init: str = "imagenet"
    use_model: str = ""  # a trained CAM network to use instead of training (irn-ray or official .pth)
    from_scratch: bool = False  # train all layers with updating BatchNorm (no pretrained weights)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's; adamw: training from scratch
    select_best: bool = False  # score every epoch on the held-out images, export the best one
    patience: int | None = None  # with select_best: stop after this many epochs without a better one
    batch_size: int = 16  # images per optimiser step, split over the workers
    epochs: int = 5  # passes over the training images (all but the held-out ones)
    max_steps: int | None = None  # cap on optimiser steps (smoke tests); None = epochs decide
    lr: float = 0.1  # backbone; the classifier gets 10x
    weight_decay: float = 1e-4  # L2 weight decay of the optimiser
    poly_power: float = 0.9  # learning rate schedule: lr * (1 - step / max_step) ** poly_power
    # augmentation: the long side resized to a random length in [low, high] before the crop
    resize_long: list[int] = field(default_factory=lambda: [320, 640])
    # augmentation: random square crop (padded when the image is smaller); held-out images are fitted into it
    crop_size: int = 512
    num_workers: int = 1  # Ray Train workers (data-parallel, DDP)
    use_gpu: bool = False  # one GPU per Ray Train worker
    bf16: bool = False  # bf16 autocast on GPU workers (opt-in)
    cpus_per_worker: float = 1.0  # CPUs each Ray Train worker reserves
    max_failures: int = 3  # Ray Train restarts from the last checkpoint after a worker failure at most this often


@dataclass
class CamsConfig:
    """CAM inference (Eq. 1) on every image."""

    # inference scales of the image; each also runs flipped and the maps are summed (Eq. 1)
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    batch_size: int = 1  # images per network forward in an actor (only images of equal size are batched together)
    num_actors: int = 1  # CAM network actors (Ray Data actor pool)
    cpus_per_actor: float = 1.0  # CPUs each CAM network actor reserves
    gpus_per_actor: float = 0.0  # GPUs each CAM network actor reserves (0: CPU; a fraction shares a GPU)
    bf16: bool = False  # bf16 autocast in the network actors on GPU (opt-in)
    keep_high_res: bool = False  # also persist full-resolution CAMs (large; the stride-4 CAMs are always kept)
    # folder of <image_id>.npz CAMs made by another method (format: docs/trust.md); no CAM network
    # is trained or run
    source: str = ""


@dataclass
class RelationsConfig:
    """CRF refinement and relation mining (Sec. 4.2)."""

    # confident foreground: the CAMs' argmax against a background score of this, refined by the CRF
    # (official conf_fg_thres)
    fg_threshold: float = 0.30
    # confident background: the same with this lower background score; pixels confident in neither
    # are ignored (255) (official conf_bg_thres)
    bg_threshold: float = 0.05
    crf_gt_prob: float = 0.7  # dense CRF unary: probability given to the thresholded label
    crf_iterations: int = 10  # dense CRF mean-field iterations
    crf_gaussian_sxy: float = 3.0  # dense CRF smoothness kernel: spatial standard deviation (pixels)
    crf_gaussian_compat: float = 3.0  # dense CRF smoothness kernel: weight (Potts compatibility)
    crf_bilateral_sxy: float = 50.0  # dense CRF appearance kernel: spatial standard deviation (pixels)
    crf_bilateral_srgb: float = 5.0  # dense CRF appearance kernel: colour standard deviation (0-255 scale)
    crf_bilateral_compat: float = 10.0  # dense CRF appearance kernel: weight (Potts compatibility)
    cpus_per_task: float = 1.0  # CPUs of each CAM fusion + CRF mining task
    max_tasks: int | None = None  # concurrent CRF tasks; None = as many as CPUs allow


@dataclass
class TrainIrnConfig:
    """IRNet training (Sec. 4.3; Ray Train)."""

    # ResNet depth of IRNet's backbone; with backbone_init cam it must equal train_cam.depth
    depth: Literal[18, 34, 50, 101] = 50
    # backbone weights (frozen unless from_scratch): imagenet (the official code's), cam (the trained
    # CAM network's, for runs without pretrained weights), none, or a weights file URI
    backbone_init: str = "imagenet"
    use_model: str = ""  # a trained IRNet to use instead of training (irn-ray or official .pth)
    from_scratch: bool = False  # the backbone trains too, updating BatchNorm (no pretrained weights)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: the paper's; adamw: training from scratch
    batch_size: int = 32  # crops per optimiser step, split over the workers
    epochs: int = 3  # passes over the IRNet training images (all but the held-out ones)
    max_steps: int | None = None  # cap on optimiser steps (smoke tests); None = epochs decide
    lr: float = 0.1  # boundary branch; the displacement branch gets 10x
    weight_decay: float = 1e-4  # L2 weight decay of the optimiser
    poly_power: float = 0.9  # learning rate schedule: lr * (1 - step / max_step) ** poly_power
    crop_size: int = 512  # random crop; a multiple of 4 (relation labels are sampled on the crop's stride-4 grid)
    # augmentation: the image rescaled by a random factor in [low, high]
    rescale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    radius: int = 10  # pairs of stride-4 cells within this distance train the boundary and displacement branches
    num_workers: int = 1  # Ray Train workers (data-parallel, DDP)
    use_gpu: bool = False  # one GPU per Ray Train worker
    bf16: bool = False  # bf16 autocast on GPU workers (opt-in)
    cpus_per_worker: float = 1.0  # CPUs each Ray Train worker reserves
    max_failures: int = 3  # Ray Train restarts from the last checkpoint after a worker failure at most this often


@dataclass
class SynthesisConfig:
    """IRNet inference and label synthesis (Sec. 5)."""

    # irnet (boundary + displacement), cam_boundary (no displacement) or cam (CAM threshold + components)
    method: Literal["irnet", "cam_boundary", "cam"] = "irnet"
    beta: float = 10.0  # random walk: affinities raised to this power (Eq. 12)
    steps: int = 256  # random walk: transition steps (the official code's 2^8)
    radius: int = 5  # random walk: affinities between stride-4 cells within this distance
    # background score of the semantic labels after the walk (official sem_seg_bg_thres)
    sem_bg_threshold: float = 0.25
    # background score of the instance labels after the walk (official ins_seg_bg_thres)
    ins_bg_threshold: float = 0.25
    cam_bg_threshold: float = 0.15  # CAM-only ablation (official cam_eval_thres)
    # Instance grouping from the displacement field: official (Eq. 10, 14: refined centroids, weak-
    # displacement candidates), density (peaks of the one-step centroid votes; a deviation for IRNets
    # without pretrained weights, docs/fidelity.md), or auto: official when IRNet's backbone is
    # pretrained (imagenet, a weights file, or train_irn.use_model), density otherwise.
    grouping: Literal["auto", "official", "density"] = "auto"
    centroid_iterations: int = 100  # official grouping: centroid refinement steps (Eq. 10)
    # official grouping: cells with a displacement shorter than this (grid cells) are centroid candidates
    centroid_threshold: float = 2.5
    density_sigma: float = 1.0  # grid cells; Gaussian smoothing of the votes (density grouping)
    # instances under this share of the image's pixels score 0; density grouping: a vote peak needs
    # this share of the pixels to be a group of its own
    min_fragment: float = 0.01
    batch_size: int = 1  # images per IRNet forward (equal padded sizes are batched together)
    num_actors: int = 1  # IRNet actors (Ray Data actor pool)
    cpus_per_actor: float = 1.0  # CPUs each IRNet actor reserves
    gpus_per_actor: float = 0.0  # GPUs each IRNet actor reserves (0: CPU; a fraction shares a GPU)
    bf16: bool = False  # bf16 autocast in the IRNet actors on GPU (opt-in)
    cpus_per_task: float = 1.0  # per post-processing task (random walk, instances, PNG/RLE writes)


@dataclass
class EvalConfig:
    """Evaluation against ground truth, when the manifest has it."""

    # mask AP is reported at each of these IoUs (the paper's AP50 and AP70)
    iou_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7])
    ablations: bool = True  # also score CAM-only and CAM + boundary (Tables 1-2)
    num_previews: int = 8  # images shown with their labels in the report
    # held-out images (at most) the CAM network's classification mAP is measured on
    max_classification_images: int = 500


@dataclass
class SegmenterConfig:
    """Mask R-CNN / DeepLab trained on a labels version (jobs.train_segmenter; paper Sec. 6.3-6.4).

    Defaults follow torchvision's reference scripts (segmentation: SGD 0.01, momentum 0.9, poly,
    520/480 resize/crop; detection: SGD 0.02, hflip, 800/1333 resizing) with ImageNet backbones.
    """

    # deeplab (DeepLab v3, ResNet-50) or maskrcnn (Mask R-CNN, ResNet-50-FPN), both torchvision's
    model: Literal["deeplab", "maskrcnn"] = "deeplab"
    labels: Literal["pseudo", "ground_truth", "both"] = "pseudo"  # ground_truth: the upper bound
    # ResNet depth of the segmenter: 50 (the paper's) or 18 (small runs; must match a cam backbone)
    depth: Literal[18, 50] = 50
    # imagenet | none (from scratch) | cam (this run's trained CAM network's backbone, the demo's head
    # start without downloadable weights) | a ResNet weights file URI of segmenter.depth
    backbone_init: str = "imagenet"
    epochs: int = 30  # passes over the training images
    max_steps: int | None = None  # cap on optimiser steps; None = epochs decide
    batch_size: int = 16  # images per optimiser step, split over the workers (DeepLab: 2+ per worker, BatchNorm)
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: torchvision's recipe; adamw: training from scratch
    lr: float = 0.01  # initial learning rate, poly decay
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 weight decay of the optimiser
    base_size: int = 520  # DeepLab: shorter side resized to [0.5, 2.0] x base_size, then cropped
    crop_size: int = 480  # DeepLab: training crop, padded with 255 (ignored)
    min_size: int = 800  # Mask R-CNN's own resizing: the shorter side to this
    max_size: int = 1333  # Mask R-CNN's own resizing: the longer side at most this
    # Mask R-CNN in training: proposals kept after NMS per image (torchvision's 2000) and RoIs
    # sampled from them for the box and mask heads (torchvision's 512, up to a quarter positive,
    # each positive a mask-head pass). Images with few objects train several times faster with
    # fewer (the demo: 300 and 64).
    rpn_proposals: int = 2000
    roi_samples: int = 512  # Mask R-CNN: RoIs sampled per image for the box and mask heads in training
    eval_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])  # DeepLab inference
    mask_threshold: float = 0.5  # Mask R-CNN mask probability
    max_eval_images: int = 1500  # held-out images evaluated (sorted by id; VOC val has 1,449)
    num_workers: int = 1  # Ray Train workers (data-parallel, DDP)
    use_gpu: bool = False  # one GPU per Ray Train worker (and a GPU task for evaluation)
    bf16: bool = False  # bf16 autocast on GPU workers (opt-in)
    cpus_per_worker: float = 1.0  # CPUs each Ray Train worker reserves, and the evaluation task (its torch threads)
    max_failures: int = 3  # Ray Train restarts from the last checkpoint after a worker failure at most this often


@dataclass
class Config:
    """The resolved configuration of one run."""

    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    train_cam: TrainCamConfig = field(default_factory=TrainCamConfig)
    cams: CamsConfig = field(default_factory=CamsConfig)
    relations: RelationsConfig = field(default_factory=RelationsConfig)
    train_irn: TrainIrnConfig = field(default_factory=TrainIrnConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class Range(NamedTuple):
    """The valid values of a numeric key: from ``low`` to ``high`` (None: unbounded), each end
    included unless it is open; ``why`` explains a bound that is not obvious. A list key's range
    holds for each element; a key that may be null is valid when null."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1]``, ``in (0, 1)`` ..."""
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}")


POSITIVE = Range(0, open_low=True)  # learning rates, CPUs of a task, kernel widths
NON_NEGATIVE = Range(0)  # weight decay, GPUs, counts where 0 means none
AT_LEAST_ONE = Range(1)  # sizes, steps, epochs, workers
SHARE = Range(0, 1)  # scores, thresholds and fractions

# The valid values of every numeric key (tests/test_config.py checks that none is missing); the
# configuration reference shows them. Cross-field rules (pairs, multiples) are in _validate.
RANGES: dict[str, Range] = {
    "data.max_pixels": AT_LEAST_ONE,
    "data.held_out_fraction": Range(0, 1, open_high=True, why="1 would hold out every image and train on none"),
    "run.seed": Range(0, why="NumPy's generators take no negative seed"), "run.shard_rows": AT_LEAST_ONE,
    "run.io_cpus": POSITIVE, "run.progress_seconds": NON_NEGATIVE, "run.decode_once_max_images": NON_NEGATIVE,
    "run.min_cam_map": SHARE, "run.min_cam_skill": SHARE,
    "run.lease_heartbeat_seconds": POSITIVE, "run.lease_expiry_seconds": POSITIVE,
    "ray.num_cpus": Range(1, why="an embedded Ray without CPUs runs no task"), "ray.num_gpus": NON_NEGATIVE,
    "train_cam.patience": AT_LEAST_ONE, "train_cam.batch_size": AT_LEAST_ONE, "train_cam.epochs": AT_LEAST_ONE,
    "train_cam.max_steps": AT_LEAST_ONE, "train_cam.lr": POSITIVE, "train_cam.weight_decay": NON_NEGATIVE,
    "train_cam.poly_power": NON_NEGATIVE, "train_cam.resize_long": AT_LEAST_ONE, "train_cam.crop_size": AT_LEAST_ONE,
    "train_cam.num_workers": AT_LEAST_ONE, "train_cam.cpus_per_worker": POSITIVE,
    "train_cam.max_failures": NON_NEGATIVE,
    "cams.scales": POSITIVE, "cams.batch_size": AT_LEAST_ONE, "cams.num_actors": AT_LEAST_ONE,
    "cams.cpus_per_actor": NON_NEGATIVE, "cams.gpus_per_actor": NON_NEGATIVE,
    "relations.fg_threshold": SHARE, "relations.bg_threshold": SHARE,
    "relations.crf_gt_prob": Range(0, 1, open_low=True, open_high=True, why="the CRF's unary is its logarithm"),
    "relations.crf_iterations": NON_NEGATIVE, "relations.crf_gaussian_sxy": POSITIVE,
    "relations.crf_gaussian_compat": NON_NEGATIVE, "relations.crf_bilateral_sxy": POSITIVE,
    "relations.crf_bilateral_srgb": POSITIVE, "relations.crf_bilateral_compat": NON_NEGATIVE,
    "relations.cpus_per_task": POSITIVE, "relations.max_tasks": AT_LEAST_ONE,
    "train_irn.batch_size": AT_LEAST_ONE, "train_irn.epochs": AT_LEAST_ONE, "train_irn.max_steps": AT_LEAST_ONE,
    "train_irn.lr": POSITIVE, "train_irn.weight_decay": NON_NEGATIVE, "train_irn.poly_power": NON_NEGATIVE,
    "train_irn.crop_size": Range(4, why="one stride-4 cell at least"), "train_irn.rescale": POSITIVE,
    "train_irn.radius": AT_LEAST_ONE, "train_irn.num_workers": AT_LEAST_ONE, "train_irn.cpus_per_worker": POSITIVE,
    "train_irn.max_failures": NON_NEGATIVE,
    "synthesis.beta": POSITIVE, "synthesis.steps": AT_LEAST_ONE, "synthesis.radius": AT_LEAST_ONE,
    "synthesis.sem_bg_threshold": SHARE, "synthesis.ins_bg_threshold": SHARE, "synthesis.cam_bg_threshold": SHARE,
    "synthesis.centroid_iterations": NON_NEGATIVE, "synthesis.centroid_threshold": POSITIVE,
    "synthesis.density_sigma": POSITIVE, "synthesis.min_fragment": SHARE, "synthesis.batch_size": AT_LEAST_ONE,
    "synthesis.num_actors": AT_LEAST_ONE, "synthesis.cpus_per_actor": NON_NEGATIVE,
    "synthesis.gpus_per_actor": NON_NEGATIVE, "synthesis.cpus_per_task": POSITIVE,
    "eval.iou_thresholds": Range(0, 1, open_low=True), "eval.num_previews": NON_NEGATIVE,
    "eval.max_classification_images": NON_NEGATIVE,
    "segmenter.epochs": AT_LEAST_ONE, "segmenter.max_steps": AT_LEAST_ONE, "segmenter.batch_size": AT_LEAST_ONE,
    "segmenter.lr": POSITIVE, "segmenter.momentum": Range(0, 1, open_high=True),
    "segmenter.weight_decay": NON_NEGATIVE, "segmenter.base_size": AT_LEAST_ONE, "segmenter.crop_size": AT_LEAST_ONE,
    "segmenter.min_size": AT_LEAST_ONE, "segmenter.max_size": AT_LEAST_ONE, "segmenter.rpn_proposals": AT_LEAST_ONE,
    "segmenter.roi_samples": AT_LEAST_ONE, "segmenter.eval_scales": POSITIVE,
    "segmenter.mask_threshold": Range(0, 1, open_high=True, why="no mask probability exceeds 1"),
    "segmenter.max_eval_images": AT_LEAST_ONE, "segmenter.num_workers": AT_LEAST_ONE,
    "segmenter.cpus_per_worker": POSITIVE, "segmenter.max_failures": NON_NEGATIVE,
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float etc.)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(args[0])}, got {value!r} "
                              f"(write it as [a, b, ...])")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: "
                              f"{', '.join(sorted(prefix + k for k in fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _default(key: str) -> str:
    """The default of ``section.key`` in JSON (``10.0``, ``null``, ``[0.5, 0.7]``)."""
    section, name = key.split(".")
    return json.dumps(getattr(getattr(Config(), section), name))


def _check_ranges(cfg: Config) -> None:
    """Every numeric key within its RANGES entry (each element of a list key; null passes)."""
    for key, valid in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        values = value if isinstance(value, list) else [value]
        for i, item in enumerate(values):
            if item is None or valid.holds(item):
                continue
            where = f"{key}[{i}]" if isinstance(value, list) else key
            why = f" ({valid.why})" if valid.why else ""
            raise ConfigError(f"{where}: must be {valid}{why}, got {item!r}; set it to a value {valid} "
                              f"(the default is {_default(key)})")


def _validate(cfg: Config) -> None:
    """Ranges (:data:`RANGES`), then the cross-field checks that a range alone cannot express."""
    _check_ranges(cfg)
    if cfg.segmenter.model == "deeplab" and cfg.segmenter.batch_size < 2 * cfg.segmenter.num_workers:
        raise ConfigError(f"segmenter.batch_size: DeepLab's BatchNorm needs at least 2 images per worker; set it to "
                          f">= {2 * cfg.segmenter.num_workers} for segmenter.num_workers={cfg.segmenter.num_workers}")
    for key, pair in (("train_cam.resize_long", cfg.train_cam.resize_long),
                      ("train_irn.rescale", cfg.train_irn.rescale)):
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"{key}: expected [low, high] with low <= high, got {pair}")
    if cfg.train_irn.crop_size % 4:
        raise ConfigError(f"train_irn.crop_size: must be a multiple of 4 (relation labels are sampled on the "
                          f"stride-4 grid of the crop), got {cfg.train_irn.crop_size}")
    for key, values in (("cams.scales", cfg.cams.scales), ("segmenter.eval_scales", cfg.segmenter.eval_scales),
                        ("eval.iou_thresholds", cfg.eval.iou_thresholds)):
        if not values:
            raise ConfigError(f"{key}: expected a non-empty list, got []; the default is {_default(key)}")
    if cfg.relations.bg_threshold > cfg.relations.fg_threshold:
        raise ConfigError(f"relations.bg_threshold: must be <= relations.fg_threshold ({cfg.relations.fg_threshold}: "
                          f"confident background uses the lower background score), got {cfg.relations.bg_threshold}; "
                          f"lower it or raise relations.fg_threshold")
    if len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError(f"data.classes: class names must be unique, got {cfg.data.classes}")
    if cfg.train_cam.backbone_init == "cam":
        raise ConfigError("train_cam.backbone_init: 'cam' is the CAM network itself; use imagenet, none or a "
                          "weights file URI")
    if cfg.cams.source and cfg.train_irn.backbone_init == "cam":
        raise ConfigError("train_irn.backbone_init: 'cam' takes the CAM network's backbone, but cams.source "
                          "replaces the CAM network; use imagenet, none or a weights file URI")
    if not cfg.run.root:
        raise ConfigError("run.root: must name a directory or URI for the outputs")
    if cfg.run.lease_expiry_seconds <= 2 * cfg.run.lease_heartbeat_seconds:
        raise ConfigError(f"run.lease_expiry_seconds: must exceed twice run.lease_heartbeat_seconds "
                          f"({cfg.run.lease_heartbeat_seconds}), or a live job's lease could expire between two "
                          f"heartbeats; got {cfg.run.lease_expiry_seconds}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train_cam.lr=0.01"`` -> (["train_cam", "lr"], 0.01); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def from_dict(values: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """Build and validate a Config from plain values plus ``section.key=value`` overrides."""
    merged = json.loads(json.dumps(values or {}))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    cfg = _build(Config, merged, "")
    _validate(cfg)
    if cfg.synthesis.grouping == "auto":
        pretrained = cfg.train_irn.use_model or cfg.train_irn.backbone_init not in ("cam", "none")
        cfg.synthesis.grouping = "official" if pretrained else "density"
    return cfg


WEIGHTS_KEYWORDS = ("none", "imagenet", "cam")  # backbone_init values that are not a weights file

# What each input must be, and what a message proposes instead.
_INPUTS = {
    "data.manifest": ("file", "a Parquet, CSV or JSON Lines manifest (docs/inputs.md)"),
    "cams.source": ("folder", "a folder of <image_id>.npz CAMs (docs/trust.md), or '' to compute the CAMs"),
    "train_cam.use_model": ("file", "a trained CAM network's file, or '' to train one"),
    "train_irn.use_model": ("file", "a trained IRNet's file, or '' to train one"),
    "train_cam.backbone_init": ("file", "imagenet, none or a weights file"),
    "train_irn.backbone_init": ("file", "imagenet, cam, none or a weights file"),
    "segmenter.backbone_init": ("file", "imagenet, cam, none or a weights file"),
}


def inputs(cfg: Config) -> list[tuple[str, str]]:
    """(``section.key``, path or URI) of every input ``cfg`` names: data.manifest, cams.source, the
    use_model files and the backbone weights files, those that are set."""
    named = [("data.manifest", cfg.data.manifest), ("cams.source", cfg.cams.source),
             ("train_cam.use_model", cfg.train_cam.use_model), ("train_irn.use_model", cfg.train_irn.use_model)]
    named += [(f"{name}.backbone_init", section.backbone_init)
              for name, section in (("train_cam", cfg.train_cam), ("train_irn", cfg.train_irn),
                                    ("segmenter", cfg.segmenter))
              if section.backbone_init not in WEIGHTS_KEYWORDS]
    return [(key, uri) for key, uri in named if uri]


def _unreadable(uri: str, kind: str) -> str:
    """Why ``uri`` cannot be read as a ``kind`` ('file' or 'folder'); '' when it can."""
    try:
        if not storage.exists(uri):
            return "does not exist"
        if storage.is_dir(uri) != (kind == "folder"):
            return f"is a {'file' if kind == 'folder' else 'folder'}, not a {kind}"
        if kind == "file":
            with storage.open_input(uri):
                pass
    except Exception as err:  # no permission, no credentials, an unknown scheme: the run could not read it either
        return f"cannot be read ({type(err).__name__}: {err})"
    return ""


def check_inputs(cfg: Config) -> None:
    """Raise ConfigError naming the first input of ``cfg`` the run could not read: data.manifest
    unset, or a file or folder (:func:`inputs`) missing, of the other kind or unreadable. It only
    looks (and opens each file); the jobs call it before any work."""
    if not cfg.data.manifest:
        raise ConfigError("data.manifest: not set; set it in the YAML or with --set data.manifest=PATH_OR_URI")
    for key, uri in inputs(cfg):
        kind, instead = _INPUTS[key]
        problem = _unreadable(uri, kind)
        if problem:
            raise ConfigError(f"{key}: {uri} {problem}; set {key} to {instead}")


def resolve_local_paths(cfg: Config) -> Config:
    """Make relative local paths absolute: Ray workers run in other working directories."""
    def absolute(value: str) -> str:
        return value if "://" in value or os.path.isabs(value) else os.path.abspath(value)

    cfg.run.root = absolute(cfg.run.root)
    for key, uri in inputs(cfg):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, absolute(uri))
    return cfg


def load_config(uri: str | None = None, overrides: list[str] = ()) -> Config:
    """Load YAML from a local path or fsspec URI (or defaults when ``uri`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if uri:
        try:
            text = storage.read_text(uri)
        except FileNotFoundError:
            raise ConfigError(f"--config: file {uri!r} does not exist") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {uri}: not valid YAML ({err})") from None
    return resolve_local_paths(from_dict(values, overrides))
