"""Materialise a labels version as a plain folder:
``python -m jobs.export --root R [--version V] --format voc|coco|yolo --out DIR [--with-images]``.

voc: SegmentationClass/ (palette PNGs), SegmentationObject/ (8-bit instance PNGs),
ImageSets/Segmentation/all.txt and coco.json; coco: coco.json; yolo: labels/<id>.txt
(segmentation polygons, one line per object part) and data.yaml. ``--with-images`` also copies each
source image (JPEGImages/ or images/, named ``<image_id><ext>``, the COCO file names then match).
The version defaults to LATEST. Files are written by Ray tasks (server-side copies on S3).
"""

from __future__ import annotations

import argparse
import json
import logging

from jobs import _cli
from pipeline import ledger
from pipeline.config import from_dict
from pipeline.io import layout, lease, storage
from pipeline.stages.export import FORMATS, export_version
from pipeline.tasks import init_ray


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="run root (local path or s3://...)")
    p.add_argument("--version", help="labels version (default: LATEST)")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    p.add_argument("--with-images", action="store_true", help="also copy the source images")
    _cli.add_verbose(p)
    args = p.parse_args(argv)
    _cli.console(args.root, verbose=args.verbose)
    holder = lease.holder(args.root)
    if holder and not holder["expired"]:  # a published version never changes: exporting it is safe
        logging.getLogger("irn-ray").info("note: %s is writing to this run root (heartbeat %.0f s ago); "
                                          "published versions do not change", lease.describe(holder), holder["age"])
    version = args.version or ledger.latest_version(args.root)
    if version is None:
        raise SystemExit(f"{args.root}: no published labels version (labels/LATEST is missing)")
    classes = json.loads(storage.read_text(layout.run_json(args.root)))["manifest"]["classes"]
    init_ray(from_dict({}))
    summary = export_version(args.root, version, args.out, fmt=args.format, classes=classes,
                             with_images=args.with_images)
    annotations = "" if summary["annotations"] is None else f", {summary['annotations']} annotations"
    print(f"exported {version}: {summary['images']} images{annotations} -> {args.out}")
    return summary


if __name__ == "__main__":
    main()
