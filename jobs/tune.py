"""Choose synthesis thresholds on the images that have ground truth:
``python -m jobs.tune --root R [--max-images 200] [--betas 5 7 10 14] [--thresholds 0.1 0.2 ...]``.

Sweeps ``synthesis.sem_bg_threshold`` and ``beta`` by mIoU, ``synthesis.ins_bg_threshold`` and
``beta`` by mask AP, from the run root's stored CAMs and trained IRNet (no training, no CAM pass),
prints the tables and the best values as ``--set`` flags, and writes ``report/tune.json``.
"""

from __future__ import annotations

import argparse
import json

from jobs import _cli
from pipeline.config import from_dict
from pipeline.io import layout, storage
from pipeline.stages.tune import BETAS, THRESHOLDS, tune
from pipeline.tasks import init_ray


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = [" ".join(f"{c:>16}" for c in columns)]
    lines += [" ".join(f"{r[c]:>16.3f}" if isinstance(r[c], float) else f"{r[c]!s:>16}" for c in columns) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="run root of a finished run (local path or s3://...)")
    p.add_argument("--max-images", type=int, default=200, help="ground-truth images to use")
    p.add_argument("--betas", type=float, nargs="+", default=BETAS)
    p.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    _cli.add_verbose(p)
    _cli.add_break_lock(p)
    args = p.parse_args(argv)
    with _cli.writing(args.root, args):
        state = json.loads(storage.read_text(layout.run_json(args.root)))
        cfg = from_dict(state["config"])
        init_ray(cfg)
        result = tune(cfg, state, max_images=args.max_images, betas=args.betas, thresholds=args.thresholds)
        print(f"tuned on {result['images']} images with ground truth")
        if result["semantic"]:
            print(_table(result["semantic"], ["beta", "sem_bg_threshold", "miou"]))
        if result["instance"]:
            print(_table(result["instance"], list(result["instance"][0])))
        flags = []
        if "best_semantic" in result:
            best = result["best_semantic"]
            flags += [f"--set synthesis.sem_bg_threshold={best['sem_bg_threshold']}"]
            print(f"best semantic: beta {best['beta']}, sem_bg_threshold {best['sem_bg_threshold']} (mIoU {best['miou']:.3f})")
        if "best_instance" in result:
            best = result["best_instance"]
            flags += [f"--set synthesis.ins_bg_threshold={best['ins_bg_threshold']}", f"--set synthesis.beta={best['beta']}"]
            print(f"best instance: beta {best['beta']}, ins_bg_threshold {best['ins_bg_threshold']} "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in best.items() if k.startswith('ap'))})")
        print("to label with them: " + " ".join(flags))
        return result


if __name__ == "__main__":
    main()
