"""Write the synthetic image set: ``python -m jobs.make_synthetic --out DIR --num-images N --seed S``."""

from __future__ import annotations

import argparse
import logging

from pipeline.data.synthetic import CLASS_NAMES, STYLES, write_synthetic_set


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory or URI (s3://...)")
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=4, help=f"2..{len(CLASS_NAMES)}")
    parser.add_argument("--min-size", type=int, default=96)
    parser.add_argument("--max-size", type=int, default=160)
    parser.add_argument("--radius", type=float, nargs=2, default=[0.09, 0.16], metavar=("MIN", "MAX"),
                        help="object radius range, as fractions of the image's shorter side")
    parser.add_argument("--style", choices=STYLES, default="shapes",
                        help="shapes: the demo's set; rings: a set the defaults were not tuned on")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of images with split 'val' (0: none)")
    parser.add_argument("--cam-like", metavar="DIR", help="also write CAM-like maps (cams.source format) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = write_synthetic_set(args.out, num_images=args.num_images, seed=args.seed,
                                   num_classes=args.num_classes, min_size=args.min_size,
                                   max_size=args.max_size, radius=tuple(args.radius), style=args.style,
                                   val_fraction=args.val_fraction, cam_like=args.cam_like)
    logging.info("wrote %d images; manifest: %s", args.num_images, manifest)
    return manifest


if __name__ == "__main__":
    main()
