"""Time and peak memory of the sparse random walk against the dense formulation.

    .venv/bin/python benchmarks/random_walk.py [--sizes 32 64 128] [--dense-max 64] [--channels 8]

Each measurement runs in its own subprocess so allocator caches and earlier peaks do not leak
between them. Memory is the peak resident set size (Linux VmHWM, reset through
/proc/self/clear_refs right before the call) minus the resident size just before the call, i.e.
everything the call itself touched: tensors, MKL/OpenMP work buffers, allocator slack. The dense
reference is the official implementation's algorithm (dense (hw)^2 affinity, A^β, column
normalisation, T^256 by 8 squarings, float32), skipped above --dense-max because at 128^2 it needs
~670 s and ~4.7 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.algorithms.pairs import destination_inside, path_affinities, search_offsets  # noqa: E402
from pipeline.algorithms.propagation import random_walk  # noqa: E402

STEPS, BETA, RADIUS = 256, 10.0, 5


def dense_random_walk(x: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Official-style dense propagation: (x ⊙ (1 − B)) · T^256 with T = A^β / column sums."""
    n, h, w = x.shape
    aff = path_affinities(boundary, RADIUS)
    inside = destination_inside(h, w, RADIUS)
    dense = torch.eye(h * w, dtype=x.dtype)
    for k, (dy, dx) in enumerate(search_offsets(RADIUS).tolist()):
        ys, xs = torch.nonzero(inside[k], as_tuple=True)
        src, dst = ys * w + xs, (ys + dy) * w + xs + dx
        dense[src, dst] = aff[k, ys, xs]
        dense[dst, src] = aff[k, ys, xs]
    del aff
    trans = dense.pow_(BETA)
    trans /= trans.sum(dim=0, keepdim=True)
    for _ in range(int(np.log2(STEPS))):
        trans = trans @ trans
    return ((x * (1 - boundary)).reshape(n, h * w) @ trans).reshape(n, h, w)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(size: int, channels: int):
    generator = torch.Generator().manual_seed(size)
    x = torch.rand(channels, size, size, generator=generator)
    boundary = torch.rand(size, size, generator=generator) ** 4
    return x, boundary


def worker(method: str, size: int, channels: int, output: str) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    run = {"sparse": lambda a, b: random_walk(a, b, beta=BETA, steps=STEPS, radius=RADIUS),
           "dense": dense_random_walk}[method]
    run(*_inputs(8, channels))  # warm-up: library initialisation is not part of the call
    x, boundary = _inputs(size, channels)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    out = run(x, boundary)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    np.save(output, out.numpy())
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - before) / 1024}))


def measure(method: str, size: int, channels: int, output: str) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--sizes", str(size),
               "--channels", str(channels), "--output", output]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dense-max", type=int, default=64, help="largest grid side run densely")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--worker", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.sizes[0], args.channels, args.output)
        return

    print(f"random_walk vs dense reference: K={args.channels} channels, {STEPS} steps, beta={BETA}, "
          f"radius={RADIUS}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("memory = peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call, "
          "one subprocess per measurement")
    header = f"{'grid':>8} {'sparse s':>9} {'sparse MiB':>11} {'dense s':>9} {'dense MiB':>10} {'speedup':>8} {'max rel diff':>13}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            sparse_file, dense_file = f"{tmp}/sparse{size}.npy", f"{tmp}/dense{size}.npy"
            sparse = measure("sparse", size, args.channels, sparse_file)
            row = f"{f'{size}x{size}':>8} {sparse['seconds']:>9.3f} {sparse['peak_mib']:>11.1f}"
            if size <= args.dense_max:
                dense = measure("dense", size, args.channels, dense_file)
                a, b = np.load(sparse_file), np.load(dense_file)
                diff = np.abs(a - b).max() / np.abs(b).max()
                row += (f" {dense['seconds']:>9.2f} {dense['peak_mib']:>10.1f}"
                        f" {dense['seconds'] / sparse['seconds']:>7.0f}x {diff:>13.1e}")
            else:
                row += f" {'skipped':>9} {'':>10} {'':>8} {'':>13}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
