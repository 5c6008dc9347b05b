"""Images/s of each per-image stage of the labelling job: CAMs, CRF relation mining, label synthesis.

    .venv/bin/python benchmarks/stages.py [--sizes 256 512] [--depth 50|18] [--images N]
                                          [--threads T] [--ray-images 8] [--no-ray]

What is timed, per image (the work the Ray operators of pipeline/stages/ do per image, without the
storage I/O around it):

1. CAM inference: ``pipeline.stages.cams.multiscale_cams`` with the paper's scales
   (1.0, 0.5, 1.5, 2.0) and flips on a CAM network, including the copy of both CAM resolutions to
   host numpy arrays (as ``CamInference`` does).
2. CRF relation mining: ``pipeline.algorithms.relations.mine_relations`` on the image and its
   full-resolution CAMs from step 1, with the paper's thresholds and CRF settings (two dense CRFs
   of 10 mean-field iterations each). Always on the CPU (pydensecrf).
3. Label synthesis: ``IRNet.infer`` (scale 1.0 + flip) followed by
   ``pipeline.stages.synthesis.synthesize(method="irnet", ...)`` on the stride-4 CAMs from step 1
   with the paper's defaults (beta 10, 256 random-walk steps, radius 5: ``SynthesisConfig()``).
   Reported as its two parts and their sum.

Inputs are synthetic images of exactly S×S pixels
(``generate_image(np.random.default_rng(i), CLASS_NAMES[:4], min_size=S, max_size=S)``, tags =
its labels). Networks are random-init (``backbone_init="none"``) ResNet-``--depth`` CAM net
(4 classes) and IRNet, in eval mode: their cost does not depend on the weights. Random weights give
near-uniform CAMs and boundaries; the CRF and the walk cost depend on the image size and the number
of tagged classes, not on how good the maps are (the instance step's cost does depend a little on
how many instances it finds). Device: CUDA when available (CAMs and IRNet under bf16 autocast, as
the stages run them), else CPU.

(a) In-process: each stage runs on ``--images`` images per size, one after another, after one
untimed warm-up call on the first image (library/kernel initialisation is not part of the per-image
cost). Reported: the median seconds per image and its inverse, images/s. Torch intra-op threads are
set to ``--threads`` (default: the CPUs this process may use); pydensecrf is single-threaded.

(b) Ray scaling of CRF mining: a local Ray (``num_cpus=2``, no dashboard) runs ``mine_relations``
over ``--ray-images`` images as ``ray.remote(num_cpus=1)`` tasks, at most 1 and then at most 2 in
flight, and reports images/s of each (wall clock from the first submission to the last result;
image + CAM arrays are put in the object store beforehand, worker processes are started and warmed
up beforehand) and the speed-up. The (image, CAM) pairs are those of (a), cycled. Each task sets
``torch.set_num_threads(1)``, matching its 1 CPU (Ray also sets OMP_NUM_THREADS to the task's CPUs).
Object-store arrays arrive read-only and pydensecrf rejects a read-only image, so each task copies
its image (untimed, ~0.2-0.8 MB) before mining; the reported task time is mine_relations alone.
On a shared machine with 2 cores the speed-up is bounded by what the other tenants leave free.

It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.algorithms.relations import mine_relations  # noqa: E402
from pipeline.config import RelationsConfig, SynthesisConfig  # noqa: E402
from pipeline.data.synthetic import CLASS_NAMES, generate_image  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.models.cam_net import build_cam_net  # noqa: E402
from pipeline.models.irnet import build_irnet  # noqa: E402
from pipeline.stages.cams import multiscale_cams  # noqa: E402
from pipeline.stages.synthesis import synthesize  # noqa: E402

CLASSES = tuple(CLASS_NAMES[:4])
SCALES = [1.0, 0.5, 1.5, 2.0]  # the paper's (CamsConfig default)


def relation_params() -> dict[str, Any]:
    """mine_relations keyword arguments from the config defaults (the paper's), as run_cams builds them."""
    cfg = RelationsConfig()
    return {"fg_threshold": cfg.fg_threshold, "bg_threshold": cfg.bg_threshold,
            **{k.removeprefix("crf_"): v for k, v in vars(cfg).items() if k.startswith("crf_")}}


def make_images(size: int, count: int) -> list[tuple[np.ndarray, list[int]]]:
    """``count`` synthetic size×size images with their tag class ids (1..4)."""
    out = []
    for i in range(count):
        sample = generate_image(np.random.default_rng(i), CLASSES, min_size=size, max_size=size)
        out.append((sample.image, sorted(CLASSES.index(name) + 1 for name in sample.labels)))
    return out


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def in_process(size: int, count: int, cam_net, irnet, device: torch.device) -> tuple[dict[str, list[float]], list]:
    """Per-image seconds of every stage on ``count`` images of size×size; also the (image, cams) pairs."""
    images = make_images(size, count)
    params, crf = SynthesisConfig(grouping="official"), relation_params()
    times: dict[str, list[float]] = {k: [] for k in ("cams", "crf", "irn_infer", "synthesize", "synthesis")}
    pairs = []

    def cam_step(image, class_ids):
        cams, high_res = multiscale_cams(cam_net, image, class_ids, SCALES, device)
        return cams.cpu().numpy(), high_res.cpu().numpy()

    def irn_step(image):
        x = torch.from_numpy(normalize(image)).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return irnet.infer(x)

    def synth_step(cams, class_ids, image, out):
        return synthesize("irnet", cams, class_ids, image.shape[:2], out.boundary, out.displacement, params)

    # Warm-up on the first image: one untimed call of every step.
    image, class_ids = images[0]
    cams, high_res = cam_step(image, class_ids)
    mine_relations(image, high_res, class_ids, **crf)
    synth_step(cams, class_ids, image, irn_step(image))

    for index, (image, class_ids) in enumerate(images):
        t_cam, (cams, high_res) = timed(lambda: cam_step(image, class_ids), device)
        t_crf, _ = timed(lambda: mine_relations(image, high_res, class_ids, **crf), torch.device("cpu"))
        t_irn, out = timed(lambda: irn_step(image), device)
        t_syn, (semantic, _, masks, _, _) = timed(lambda: synth_step(cams, class_ids, image, out), device)
        times["cams"].append(t_cam)
        times["crf"].append(t_crf)
        times["irn_infer"].append(t_irn)
        times["synthesize"].append(t_syn)
        times["synthesis"].append(t_irn + t_syn)
        pairs.append((image, high_res, class_ids))
        print(f"  [{size}x{size} image {index}: {len(class_ids)} tags, cams {t_cam:.2f}s, crf {t_crf:.2f}s, "
              f"irn infer {t_irn:.2f}s, synthesize {t_syn:.2f}s ({len(masks)} instances)]", flush=True)
    return times, pairs


def ray_scaling(pairs_by_size: dict[int, list], num_images: int, concurrencies: list[int]) -> list[dict[str, Any]]:
    """Wall-clock images/s of mine_relations as Ray tasks with at most c in flight, per size and c."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=max(concurrencies), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        @ray.remote(num_cpus=1)
        def mine(image, high_res, class_ids, params):
            torch.set_num_threads(1)
            # Object-store arrays are read-only views and pydensecrf's bilateral term needs a
            # writable buffer: copy the image first (as a task receiving a fresh array would have it).
            image = np.array(image)
            start = time.perf_counter()
            mine_relations(image, high_res, class_ids, **params)
            return time.perf_counter() - start, os.getpid()

        @ray.remote(num_cpus=1)
        def warm_up(seconds):
            torch.set_num_threads(1)
            tiny = np.zeros((16, 16, 3), np.uint8)
            mine_relations(tiny, np.zeros((1, 16, 16), np.float32), [1])  # imports pydensecrf
            time.sleep(seconds)  # keep this worker busy so the next warm-up task starts another
            return os.getpid()

        # Start (and import into) as many workers as the largest concurrency before any timing.
        pids = set(ray.get([warm_up.remote(2.0) for _ in range(max(concurrencies))]))
        params = relation_params()
        results = []
        for size, pairs in pairs_by_size.items():
            refs = [tuple(ray.put(v) for v in pairs[i % len(pairs)]) for i in range(num_images)]
            ray.get(mine.remote(*refs[0], params))  # warm-up at this size (untimed)
            for concurrency in concurrencies:
                start, pending, done = time.perf_counter(), [], []
                for ref in refs:
                    if len(pending) >= concurrency:
                        ready, pending = ray.wait(pending, num_returns=1)
                        done += ray.get(ready)
                    pending.append(mine.remote(*ref, params))
                done += ray.get(pending)
                wall = time.perf_counter() - start
                results.append({"size": size, "concurrency": concurrency, "images": num_images, "wall": wall,
                                "task_median": statistics.median(t for t, _ in done),
                                "workers": len({pid for _, pid in done}), "warm_workers": len(pids)})
                print(f"  [ray {size}x{size} concurrency {concurrency}: {num_images} images in {wall:.2f}s]",
                      flush=True)
        return results
    finally:
        ray.shutdown()


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image side(s) in pixels")
    parser.add_argument("--depth", type=int, choices=[18, 50], default=50, help="ResNet depth (50 = the paper)")
    parser.add_argument("--images", type=int, default=None, help="timed images per size (default 4 on CPU, 16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for (a) (default: the CPUs available to this process)")
    parser.add_argument("--ray-images", type=int, default=8, help="images per Ray CRF run in (b)")
    parser.add_argument("--ray-sizes", type=int, nargs="+", default=None,
                        help="sizes for (b) (default: the same as --sizes)")
    parser.add_argument("--no-ray", action="store_true", help="skip (b)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = args.images or (16 if device.type == "cuda" else 4)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cpus
    torch.set_num_threads(threads)
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"{cpus} CPUs available, torch {torch.__version__}, ResNet-{args.depth}, scales {SCALES} + flips, "
          f"{count} timed images per size (+1 warm-up), load average {_load()}")
    print(f"threads: (a) torch.set_num_threads({threads}) for CAMs, IRNet and synthesis; pydensecrf CRF is "
          f"single-threaded; (b) each Ray task torch.set_num_threads(1) on its 1 CPU")

    torch.manual_seed(0)
    cam_net = build_cam_net(num_classes=len(CLASSES), depth=args.depth, backbone_init="none").to(device).eval()
    irnet = build_irnet(depth=args.depth, backbone_init="none").to(device).eval()

    rows, pairs_by_size = [], {}
    names = [("cams", "1 CAM inference (4 scales + flips)", device),
             ("crf", "2 CRF relation mining", torch.device("cpu")),
             ("irn_infer", "3a IRNet infer", device),
             ("synthesize", "3b synthesize (walk + instances)", device),
             ("synthesis", "3 label synthesis (3a + 3b)", device)]
    for size in args.sizes:
        print(f"(a) in-process, {size}x{size}:", flush=True)
        times, pairs_by_size[size] = in_process(size, count, cam_net, irnet, device)
        for key, label, dev in names:
            median = statistics.median(times[key])
            rows.append([label, f"{size}x{size}", dev.type, str(1 if key == "crf" else threads),
                         f"{median:.3f}", f"{1 / median:.3f}"])

    ray_rows = []
    if not args.no_ray:
        sizes = args.ray_sizes or args.sizes
        missing = [s for s in sizes if s not in pairs_by_size]
        if missing:
            raise SystemExit(f"--ray-sizes {missing} must be among --sizes (their CAMs come from (a))")
        print("(b) CRF mining as Ray tasks:", flush=True)
        results = ray_scaling({s: pairs_by_size[s] for s in sizes}, args.ray_images, [1, 2])
        base = {r["size"]: r["images"] / r["wall"] for r in results if r["concurrency"] == 1}
        for r in results:
            rate = r["images"] / r["wall"]
            ray_rows.append([f"{r['size']}x{r['size']}", str(r["concurrency"]), str(r["images"]),
                             str(r["workers"]), f"{r['wall']:.2f}", f"{r['task_median']:.3f}", f"{rate:.3f}",
                             f"{rate / base[r['size']]:.2f}x"])

    print(f"\nload average at the end {_load()} (1/5/15 min; above the CPU count = shared with other work)")
    print(f"(a) per-image stage time, in-process, median over {count} images (ResNet-{args.depth})")
    print_table(["stage", "size", "device", "threads", "s/image", "images/s"], rows)
    if ray_rows:
        print("\n(b) CRF relation mining as Ray tasks (num_cpus=1 each, torch threads 1), local Ray num_cpus=2")
        print_table(["size", "in flight", "images", "workers used", "wall s", "task s (median)", "images/s",
                     "speed-up"], ray_rows)


if __name__ == "__main__":
    main()
