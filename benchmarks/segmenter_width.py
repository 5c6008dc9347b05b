"""Mask R-CNN on a ResNet-18 FPN body: torchvision's width (FPN and mask head at 256 channels) against
the half width ``segmenter.depth: 18`` builds (128), in training and prediction images/s.

    .venv/bin/python benchmarks/segmenter_width.py [--root runs/demo] [--threads 2] [--steps 6]

Needs a labelled demo run root (``make demo``). Both networks start from the run's CAM backbone
and train on the same batches of 4 of the version's pseudo labels (as ``make demo`` does: 300
proposals, 64 sampled RoIs, images at their own size), then predict the held-out images one by one.
The first two steps are warm-up and not timed. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def torchvision_width(backbone_init: str, num_classes: int, detection: dict) -> torch.nn.Module:
    """Mask R-CNN as torchvision builds it on a ResNet-18 FPN body (256 channels)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    from pipeline.models.segmenters import _load_backbone

    body = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    _load_backbone(body, backbone_init, 18)
    return torchvision.models.detection.MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=num_classes + 1,
                                                 **detection)


def measure(net: torch.nn.Module, maker, train_rows: list[dict], eval_images: list[np.ndarray], steps: int,
            ) -> tuple[float, float]:
    """(training images/s, prediction images/s) of ``net``."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], 3e-4)
    net.train()
    for step in range(steps + 2):
        if step == 2:
            t0 = time.perf_counter()
        rows = [train_rows[(4 * step + i) % len(train_rows)] for i in range(4)]
        batch = maker.collate([maker.augment(r, rng) for r in rows], torch.device("cpu"))
        loss = sum(net(batch["image"], batch["targets"]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_rate = 4 * steps / (time.perf_counter() - t0)
    net.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for image in eval_images:
            net([torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0])
    return train_rate, len(eval_images) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline import ledger
    from pipeline.data.images import decode_image
    from pipeline.io import layout, storage
    from pipeline.models.segmenters import build_segmenter
    from pipeline.train.segmenter import SegmenterSamples, segmenter_rows

    state = ledger.RunState(args.root)
    version, manifest = ledger.latest_version(args.root), state.data["manifest"]
    labels_dir, manifest_dir = layout.labels_dir(args.root, version), layout.manifest_dir(args.root, manifest["stamp"])
    classes = manifest["classes"]
    maker = SegmenterSamples(model="maskrcnn", base_size=128, crop_size=96, max_pixels=10**8)
    train_table, _ = segmenter_rows(labels_dir, manifest_dir, classes, labels="pseudo")
    train_rows = [d for d in map(maker.decode, train_table.to_pylist()) if d is not None]
    eval_table, _ = segmenter_rows(labels_dir, manifest_dir, classes, labels="ground_truth", evaluation=True)
    eval_images = [decode_image(storage.read_bytes(r["uri"])) for r in eval_table.to_pylist()]
    backbone = layout.model_file(args.root, "cam")
    detection = {"min_size": 128, "max_size": 192, "rpn_post_nms_top_n_train": 300, "box_batch_size_per_image": 64}
    nets = {"torchvision (256)": torchvision_width(backbone, len(classes), detection),
            "half width (128)": build_segmenter("maskrcnn", len(classes), depth=18, backbone_init=backbone,
                                                min_size=128, max_size=192, rpn_proposals=300, roi_samples=64)}
    print(f"Mask R-CNN ResNet-18 FPN, {args.threads} torch threads, {len(train_rows)} training images, "
          f"{len(eval_images)} held-out images ({args.root})")
    print(f"{'width':<18} {'train img/s':>12} {'predict img/s':>14}")
    results = {}
    for name, net in nets.items():
        results[name] = measure(net, maker, train_rows, eval_images, args.steps)
        print(f"{name:<18} {results[name][0]:>12.2f} {results[name][1]:>14.2f}")
    (base_train, base_eval), (half_train, half_eval) = results.values()
    print(json.dumps({"train_ratio": round(half_train / base_train, 2), "predict_ratio": round(half_eval / base_eval, 2)}))


if __name__ == "__main__":
    main()
