"""Images/s of one training step of the CAM network and of IRNet at the paper's crop.

    .venv/bin/python benchmarks/train_throughput.py [--batch N] [--steps N] [--warmup N]
                                                    [--crop 512] [--depth 50]

A step is what the training loops do per batch (pipeline/train/cam.py, irn.py): forward, the real
loss, backward, SGD (no momentum, weight decay 1e-4, the parameter groups of
``model.parameter_groups()`` at lr and 10x lr). CAM: multilabel soft-margin loss on random
multi-hot targets. IRNet: the stride-4 pair labels of a random 0/1/2/255 relation map are built on
the device inside the step, as in training, then ``irn_losses(..., radius=10)["total"]``.
Weights are random (``backbone_init="none"``); inputs are random; nothing is asserted.

Precisions: fp32 everywhere; on CUDA also bf16 autocast + channels_last (what training uses).
Each measurement runs in its own subprocess, so peaks and allocator caches do not leak between
them. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (tensors only) and the peak
resident set size of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: weights, Python,
libraries, allocator slack, everything) on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.algorithms.losses import irn_losses  # noqa: E402
from pipeline.algorithms.pairs import relation_pair_labels  # noqa: E402
from pipeline.models import build_cam_net  # noqa: E402
from pipeline.models.irnet import build_irnet  # noqa: E402
from pipeline.train.common import make_optimizer  # noqa: E402

NUM_CLASSES, RADIUS, LR, WEIGHT_DECAY = 20, 10, 0.1, 1e-4
GPU_BATCH = {"cam": 16, "irn": 32}


def pair_labels(relations: torch.Tensor, radius: int = RADIUS) -> tuple[torch.Tensor, ...]:
    """uint8 [B, h, w] relation maps (0 bg, c, 255 ignore) -> (bg, fg, neg), each float [B, P, h, w]."""
    per_image = [relation_pair_labels(r, radius) for r in relations]
    return tuple(torch.stack([labels[k] for labels in per_image]).float() for k in range(3))


def make_step(network: str, *, batch: int, crop: int, depth: int, device: torch.device,
              bf16: bool) -> Callable[[], torch.Tensor]:
    """A closure running one training step on fixed random inputs; returns the loss (0-dim, detached).

    Inputs: images float [batch, 3, crop, crop] ~ N(0, 1) (already "normalised"); CAM targets
    float {0, 1} [batch, 20] with >= 1 positive; IRNet relation maps uint8 [batch, h, w] with
    h = w = ceil(crop / 4), values drawn uniformly from {0, 1, 2, 255}.
    """
    gen = torch.Generator().manual_seed(0)
    if network == "cam":
        model = build_cam_net(num_classes=NUM_CLASSES, depth=depth, backbone_init="none")
    else:
        model = build_irnet(depth=depth, backbone_init="none")
    first, second = model.parameter_groups()
    optimizer = make_optimizer([(first, LR), (second, 10 * LR)], WEIGHT_DECAY)
    memory_format = torch.channels_last if bf16 else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    images = torch.randn(batch, 3, crop, crop, generator=gen).to(device).contiguous(memory_format=memory_format)
    grid = -(-crop // 4)
    targets = (torch.rand(batch, NUM_CLASSES, generator=gen) < 0.1).float()
    targets[torch.arange(batch), torch.randint(NUM_CLASSES, (batch,), generator=gen)] = 1.0
    targets = targets.to(device)
    values = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    relations = values[torch.randint(4, (batch, grid, grid), generator=gen)].to(device)

    def step() -> torch.Tensor:
        if network == "cam":
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
            loss = F.multilabel_soft_margin_loss(logits.float(), targets)
        else:
            bg, fg, neg = pair_labels(relations)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(images)
            loss = irn_losses(out.boundary_logits.float(), out.displacement.float(), bg, fg, neg,
                              radius=RADIUS)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()  # no .item(): no host sync inside the timed loop

    return step


def worker(network: str, precision: str, *, batch: int, steps: int, warmup: int, crop: int, depth: int) -> dict:
    """Measure one (network, precision) in this process: seconds/step, images/s, peak memory (MiB)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = make_step(network, batch=batch, crop=crop, depth=depth, device=device, bf16=precision == "bf16+cl")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds_per_step": seconds / steps, "images_per_s": batch * steps / seconds,
            "peak_mib": peak_mib, "loss": float(loss)}


def measure(network: str, precision: str, **settings) -> dict:
    """Run :func:`worker` in a fresh subprocess; {"error": ...} if it fails (e.g. out of memory)."""
    command = [sys.executable, __file__, "--worker", network, precision]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1][:120] if lines else f"exit status {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, help="images per step (default CAM 16 / IRNet 32 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101])
    parser.add_argument("--worker", nargs=2, metavar=("NETWORK", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        settings = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "crop": args.crop,
                    "depth": args.depth}
        print(json.dumps(worker(*args.worker, **settings)))
        return

    cuda = torch.cuda.is_available()
    steps = args.steps or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    precisions = ["fp32", "bf16+cl"] if cuda else ["fp32"]
    if cuda:
        device = (f"cuda: {torch.cuda.get_device_name()} (cudnn TF32 for fp32 convs: "
                  f"{torch.backends.cudnn.allow_tf32})")
        memory = "peak memory = torch.cuda.max_memory_allocated over the timed steps"
    else:
        device = f"cpu: {torch.get_num_threads()} threads"
        memory = "peak memory = peak RSS of the measuring process (resource.getrusage ru_maxrss)"
    print(f"training-step throughput, ResNet-{args.depth}, crop {args.crop}, random weights, torch "
          f"{torch.__version__}, {device}")
    print(f"{steps} timed steps after {warmup} warm-up steps, one subprocess per row; {memory}")
    print(f"{'network':>8} {'precision':>10} {'batch':>6} {'steps':>6} {'s/step':>9} {'images/s':>9} {'peak MiB':>9}")
    for network in ("cam", "irn"):
        batch = args.batch or (GPU_BATCH[network] if cuda else 2)
        for precision in precisions:
            result = measure(network, precision, batch=batch, steps=steps, warmup=warmup, crop=args.crop,
                             depth=args.depth)
            row = f"{network:>8} {precision:>10} {batch:>6} {steps:>6}"
            if "error" in result:
                print(f"{row} failed: {result['error']}", flush=True)
                continue
            print(f"{row} {result['seconds_per_step']:>9.3f} {result['images_per_s']:>9.2f} "
                  f"{result['peak_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
