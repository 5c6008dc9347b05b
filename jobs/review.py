"""Send the labels most in doubt to a person:
``python -m jobs.review --root R [--version V] --worst K --out DIR [--format coco|labelstudio] [--with-images]``.

Writes ``ranking.csv`` (every image of the version, most in doubt first, with its doubt signals)
and the K images most in doubt (ties by id) with their current labels as pre-annotations:
``annotations.json`` for CVAT's "COCO 1.0" import, or ``tasks.json`` for Label Studio (polygon
predictions; its labelling config needs ``<Image name="image">`` and ``<PolygonLabels
name="label">``). ``--with-images`` copies those images into ``images/``. The version defaults to
LATEST. Reads the run root only: no lease is needed.
"""

from __future__ import annotations

import argparse
import json
import logging

from jobs import _console
from pipeline import ledger
from pipeline.io import layout, storage
from pipeline.stages.review import FORMATS, write_review


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="run root (local path or s3://...)")
    p.add_argument("--version", help="labels version (default: LATEST)")
    p.add_argument("--worst", type=int, required=True, help="how many images to send for review (>= 1)")
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    p.add_argument("--format", choices=FORMATS, default="coco")
    p.add_argument("--with-images", action="store_true", help="also copy the images under review")
    args = p.parse_args(argv)
    if args.worst < 1:
        p.error("--worst must be at least 1")
    version = args.version or ledger.latest_version(args.root)
    if version is None or not storage.exists(layout.index_file(layout.labels_dir(args.root, version))):
        raise SystemExit(f"{args.root}: no published labels version {version or '(labels/LATEST is missing)'}")
    classes = json.loads(storage.read_text(layout.run_json(args.root)))["manifest"]["classes"]
    logging.basicConfig(level=logging.INFO, format=_console.LOG_FORMAT)  # no Ray here: our lines only
    summary = write_review(args.root, version, args.out, worst=args.worst, fmt=args.format, classes=classes,
                           with_images=args.with_images)
    low, high = summary["doubt_range"]
    print(f"review of {version}: {summary['images']} of {summary['ranked']} images (doubt {high:.3f} down to "
          f"{low:.3f}), {summary['annotations']} pre-annotations -> {args.out}")
    return summary


if __name__ == "__main__":
    main()
