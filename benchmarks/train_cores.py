"""Training images/s of the demo's CAM network and IRNet: before (1 CPU, decoded every epoch) and
after (every CPU, decoded once per run).

    .venv/bin/python benchmarks/train_cores.py [--root runs/demo] [--epochs 3]

Needs a labelled demo run root (``make demo``'s label step writes ``runs/demo``): each training
runs on a copy of it, through the job itself (``jobs.train_cam`` / ``jobs.train_irn`` with
``run.retrain=always``, the demo config, no per-epoch held-out scoring) on an embedded Ray with
the machine's CPUs, for ``--epochs`` epochs, in two settings:

* before: ``cpus_per_worker: 1`` and ``run.decode_once_max_images: 0`` (Ray Data actors decode and
  augment every epoch; torch on 1 thread), what the demo did before;
* after: ``cpus_per_worker: <all CPUs>`` and the images decoded once before training (torch on
  every CPU; augmentation in the training worker).

Reported: the training loop's images/s (rank 0, from the exported model's metrics: steps only)
and the stage's wall seconds (run.json: Ray Train start, decoding, every epoch, export). It
measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(root: str, network: str, settings: list[str], epochs: int) -> tuple[float, float]:
    """(loop images/s, stage seconds) of one training of ``network`` in the run root ``root``."""
    section = f"train_{network}"
    overrides = [f"run.root={root}", "run.retrain=always", f"{section}.epochs={epochs}", "run.min_cam_map=0"]
    if network == "cam":
        overrides.append("train_cam.select_best=false")
    command = [sys.executable, "-m", f"jobs.{section}", "--config", "configs/demo.yaml"]
    for item in overrides + settings:
        command += ["--set", item]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = json.loads(Path(root, "models", network, "model.pt.json").read_text())
    stage = json.loads(Path(root, "run.json").read_text())["stages"][section]
    return meta["metrics"]["images_per_s_per_worker"], stage["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/demo", help="a labelled demo run root")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    settings = {"before": lambda s: [f"{s}.cpus_per_worker=1", "run.decode_once_max_images=0"],
                "after": lambda s: [f"{s}.cpus_per_worker={cpus}", "run.decode_once_max_images=2000"]}
    print(f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f}; {args.epochs} epochs of the demo config")
    print(f"{'network':<8} {'setting':<7} {'images/s':>9} {'stage s':>8}")
    for network in ("cam", "irn"):
        rates = {}
        for name, make in settings.items():
            with tempfile.TemporaryDirectory() as work:
                root = os.path.join(work, "run")
                shutil.copytree(REPO / args.root if not os.path.isabs(args.root) else args.root, root)
                rates[name], seconds = train(root, network, make(f"train_{network}"), args.epochs)
            print(f"{network:<8} {name:<7} {rates[name]:>9.2f} {seconds:>8.1f}", flush=True)
        print(f"{network:<8} {'ratio':<7} {rates['after'] / rates['before']:>9.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
