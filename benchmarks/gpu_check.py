"""``make gpu-check``: what the pipeline does on a CUDA GPU, in one run of a few minutes.

    python benchmarks/gpu_check.py [--size 512] [--depth 50] [--images 8] [--no-label-job]

1. Per-image stage speed (``benchmarks/stages.py``'s work, random weights, synthetic S x S images):
   CAM inference (``multiscale_cams``, the paper's 4 scales + flips) and IRNet label synthesis
   (``IRNet.infer`` + ``synthesize``: random walk and instances), in fp32 and bf16 autocast.
2. Training-step speed of the CAM network and IRNet (``benchmarks/train_throughput.py``'s step:
   forward, the real loss, backward, SGD) at the paper's 512 crop, fp32 and bf16 + channels_last.
3. The random walk (``pipeline.algorithms.propagation.random_walk``, beta 10, 256 steps, radius 5)
   on CUDA against the CPU one at 128^2 and 256^2: seconds of each and the largest difference.
4. A tiny end-to-end label job (``jobs.label`` on a generated set, ``configs/tiny.yaml``) with
   ``train_cam.use_gpu``, ``train_irn.use_gpu``, ``cams.gpus_per_actor`` and
   ``synthesis.gpus_per_actor``: each stage's seconds and what it wrote. Needs Ray and pydensecrf.

Without a CUDA device it prints one line saying so and exits 0. It measures and prints; it
asserts nothing, except that the label job exits 0 (its exit status is this script's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]


def stage_speed(size: int, depth: int, images: int, device: torch.device) -> list[list[str]]:
    """Images/s of CAM inference and of IRNet synthesis on ``device``, fp32 and bf16."""
    import stages  # benchmarks/stages.py

    from pipeline.config import SynthesisConfig
    from pipeline.data.transforms import normalize
    from pipeline.models.cam_net import build_cam_net
    from pipeline.models.irnet import build_irnet

    torch.manual_seed(0)
    cam_net = build_cam_net(num_classes=len(stages.CLASSES), depth=depth, backbone_init="none").to(device).eval()
    irnet = build_irnet(depth=depth, backbone_init="none").to(device).eval()
    params = SynthesisConfig(grouping="official")
    samples = stages.make_images(size, images + 1)
    rows = []
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"

        def cam_step(image, class_ids):
            cams, high_res = stages.multiscale_cams(cam_net, image, class_ids, stages.SCALES, device, bf16)
            return cams.cpu().numpy(), high_res.cpu().numpy()

        def synthesis_step(image, class_ids, cams):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = irnet.infer(torch.from_numpy(normalize(image)).to(device))
            return stages.synthesize("irnet", cams, class_ids, image.shape[:2], out.boundary.float(),
                                     out.displacement.float(), params)

        cam_times, synthesis_times = [], []
        for index, (image, class_ids) in enumerate(samples):  # the first image warms up, untimed
            t_cam, (cams, _) = stages.timed(lambda: cam_step(image, class_ids), device)
            t_syn, _ = stages.timed(lambda: synthesis_step(image, class_ids, cams), device)
            if index:
                cam_times.append(t_cam)
                synthesis_times.append(t_syn)
        for stage, times in (("CAM inference (4 scales + flips)", cam_times),
                             ("IRNet synthesis (infer + walk + instances)", synthesis_times)):
            median = statistics.median(times)
            rows.append([stage, precision, f"{size}x{size}", f"{median:.4f}", f"{1 / median:.1f}"])
    return rows


def training_speed(depth: int, crop: int, cuda: bool) -> list[list[str]]:
    """Images/s of one training step of each network (on CUDA when there is one), fp32 and
    bf16 + channels_last."""
    import train_throughput  # benchmarks/train_throughput.py

    rows = []
    for network in ("cam", "irn"):
        batch = train_throughput.GPU_BATCH[network] if cuda else 2
        for precision in ("fp32", "bf16+cl"):
            result = train_throughput.measure(network, precision, batch=batch, steps=10, warmup=3, crop=crop,
                                              depth=depth)
            if "error" in result:
                rows.append([f"train {network}", precision, str(batch), "failed", result["error"], ""])
                continue
            rows.append([f"train {network}", precision, str(batch), f"{result['seconds_per_step']:.4f}",
                         f"{result['images_per_s']:.1f}", f"{result['peak_mib']:.0f}"])
    return rows


def random_walk_check(sizes: list[int], device: torch.device) -> list[list[str]]:
    """The random walk on ``device`` against the CPU one on the same random CAMs and boundary."""
    from pipeline.algorithms.propagation import random_walk

    rows = []
    for size in sizes:
        gen = torch.Generator().manual_seed(size)
        x = torch.rand(3, size, size, generator=gen, dtype=torch.float64)
        boundary = torch.rand(size, size, generator=gen, dtype=torch.float64) ** 4  # mostly low, some edges
        start = time.perf_counter()
        cpu = random_walk(x, boundary)
        t_cpu = time.perf_counter() - start
        random_walk(x[:, :8, :8].to(device), boundary[:8, :8].to(device))  # CUDA context and kernels warm
        t_gpu, gpu = stages_timed(lambda: random_walk(x.to(device), boundary.to(device)), device)
        diff = (gpu.cpu() - cpu).abs().max().item() / max(cpu.abs().max().item(), 1e-12)
        rows.append([f"{size}x{size}", f"{t_cpu:.3f}", f"{t_gpu:.4f}", f"{t_cpu / t_gpu:.1f}x", f"{diff:.2e}"])
    return rows


def stages_timed(fn, device: torch.device):
    import stages  # benchmarks/stages.py

    return stages.timed(fn, device)


def label_job(workdir: str, cpus: int, gpu: bool) -> tuple[int, list[list[str]]]:
    """Run the tiny label job (on the GPU with ``gpu``); (exit status, rows of stage, status, seconds)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    data, root = os.path.join(workdir, "data"), os.path.join(workdir, "run")
    subprocess.run([sys.executable, "-m", "jobs.make_synthetic", "--out", data, "--num-images", "24",
                    "--min-size", "128", "--max-size", "192"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    overrides = [f"data.manifest={data}/manifest.parquet", f"run.root={root}", f"ray.num_cpus={cpus}"]
    if gpu:
        overrides += ["ray.num_gpus=1", "train_cam.use_gpu=true", "train_cam.bf16=true", "train_irn.use_gpu=true",
                      "train_irn.bf16=true", "cams.gpus_per_actor=0.5", "cams.bf16=true",
                      "synthesis.gpus_per_actor=0.5", "synthesis.bf16=true"]
    command = [sys.executable, "-m", "jobs.label", "--config", "configs/tiny.yaml"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        return done.returncode, []
    from pipeline.ledger import STAGES

    state = json.loads(Path(root, "run.json").read_text())
    stages = state["stages"]
    rows = [[name, stages[name].get("status", ""), f"{stages[name].get('seconds', 0):.1f}"]
            for name in ("manifest",) + tuple(STAGES) if name in stages]
    rows.append(["(whole job, wall)", f"labels {state['last_run']['labels_version']}", f"{wall:.1f}"])
    return 0, rows


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image side for the stage timings")
    parser.add_argument("--depth", type=int, default=50, choices=[18, 50], help="ResNet depth (50: the paper's)")
    parser.add_argument("--images", type=int, default=8, help="timed images per stage and precision")
    parser.add_argument("--walk-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--no-label-job", action="store_true", help="skip the end-to-end label job")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every part on the CPU (tiny sizes: checks the script, measures nothing useful)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing measured.")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    print(f"gpu-check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
    t0 = time.perf_counter()
    print_table(f"1. stage speed per image, ResNet-{args.depth}, median of {args.images} images (random weights)",
                ["stage", "precision", "size", "s/image", "images/s"],
                stage_speed(args.size, args.depth, args.images, device))
    crop = 512 if cuda else 64
    print_table(f"2. training step, ResNet-{args.depth}, crop {crop}, 10 steps after 3 warm-up",
                ["network", "precision", "batch", "s/step", "images/s", "peak MiB"],
                training_speed(args.depth, crop, cuda))
    print_table("3. random walk (beta 10, 256 steps, radius 5, float64, 3 maps): CUDA against CPU",
                ["size", "CPU s", "CUDA s", "speed-up", "max |diff| / max"],
                random_walk_check(args.walk_sizes, device))
    status = 0
    if args.no_label_job:
        print("\n4. end-to-end label job: skipped (--no-label-job)")
    else:
        missing = [m for m in ("ray", "pydensecrf") if not _importable(m)]
        if missing:
            print(f"\n4. end-to-end label job: skipped, {' and '.join(missing)} not installed here")
        else:
            with tempfile.TemporaryDirectory() as workdir:
                status, rows = label_job(workdir, cpus=min(8, len(os.sched_getaffinity(0))), gpu=cuda)
            if status:
                print(f"\n4. end-to-end label job FAILED with exit status {status} (its output is above)")
            else:
                print_table("4. end-to-end label job on the GPU (24 images, configs/tiny.yaml, use_gpu, "
                            "gpus_per_actor 0.5, bf16)", ["stage", "status", "seconds"], rows)
    print(f"\ngpu-check took {time.perf_counter() - t0:.0f} s")
    return status


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    raise SystemExit(main())
