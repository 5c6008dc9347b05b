"""Take people's corrections of labels: ``python -m jobs.correct --root R --from PATH [--note TEXT]``.

PATH is a corrected COCO JSON (the form ``jobs.export --format coco`` and ``jobs.review`` write:
``file_name`` is the image id; RLE or polygons) or a VOC folder (SegmentationClass +
SegmentationObject). An image present in the file has all of its instances there; an image with
none is background. The whole file is checked first (image ids in the run's manifest, classes of
the run, masks inside their images, a well-formed file): on any error one line names the entry,
exit status 2, and nothing is stored. A valid file is stored under ``corrections/`` of the run
root, never rewritten; images equal to their stored correction are not stored again (a file with
nothing new stores nothing), and the newest correction of an image wins. Holds the run root's
lease while it writes. The next labelling run puts the corrections into its version, verbatim
(docs/review.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs import _cli
from pipeline.io import layout, storage
from pipeline.stages.corrections import (
    CorrectionError,
    read_corrections,
    store_corrections,
    unchanged,
)


def main(argv: list[str] | None = None) -> str | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="run root (local path or s3://...)")
    p.add_argument("--from", dest="source", required=True, help="corrected COCO JSON or VOC folder")
    p.add_argument("--note", default="", help="a note kept with the correction (who, why)")
    _cli.add_verbose(p)
    _cli.add_break_lock(p)
    args = p.parse_args(argv)
    if not storage.exists(layout.run_json(args.root)):
        raise SystemExit(f"{args.root}: no labelling run here (no run.json)")
    classes = json.loads(storage.read_text(layout.run_json(args.root)))["manifest"]["classes"]
    try:  # read only: checked whole before the lease is taken and anything is written
        corrected = read_corrections(args.root, args.source, classes)
    except CorrectionError as err:
        print(f"correction error: {args.source}: {err}; nothing was stored", file=sys.stderr)
        raise SystemExit(2) from None
    with _cli.writing(args.root, args):
        same = unchanged(args.root, corrected)
        new = [c for c in corrected if c.image_id not in same]
        kept = f"; {len(same)} equal to their stored correction, not stored again" if same else ""
        if not new:
            print(f"corrections: nothing new in {args.source}{kept}")
            return None
        name = store_corrections(args.root, new, note=args.note, source=args.source)
        logging.getLogger("irn-ray").info("stored %d corrected image(s) as %s", len(new),
                                          layout.correction_dir(args.root, name))
        print(f"corrections: {len(new)} image(s) stored in {layout.correction_dir(args.root, name)}{kept}")
        return name


if __name__ == "__main__":
    main()
