"""Label a data set end to end: ``python -m jobs.label --config FILE [--set key=value ...]``.

The stages are ``pipeline.ledger.STAGES``; each is skipped when its outputs are current;
``--from-stage S`` reruns S and everything after it, ``--only S`` runs S alone (and the probe, which
finds the images that do not decode). The console shows our lines;
Ray's own go to ``<run root>/run.log``, and to the console too with ``--verbose``.
"""

from __future__ import annotations

import json
import logging

from jobs import _cli
from pipeline.io import layout, storage
from pipeline.ledger import STAGES
from pipeline.orchestrate import run_label
from pipeline.train.cam import QualityGateError, cam_skill


def main(argv: list[str] | None = None) -> dict:
    p = _cli.parser(__doc__)
    p.add_argument("--from-stage", choices=STAGES, help="rerun this stage and all after it")
    p.add_argument("--only", choices=STAGES, action="append", help="run only this stage (repeatable)")
    args = p.parse_args(argv)
    with _cli.job(args) as cfg:
        try:
            state = run_label(cfg, from_stage=args.from_stage, only=args.only)
        except QualityGateError as err:
            logging.getLogger("irn-ray").error("%s", err)
            raise SystemExit(3) from None
        root = cfg.run.root
        print(f"labels: {layout.labels_dir(root, state['last_run']['labels_version'] or '-')}")
        print(f"report: {storage.join(layout.report_dir(root), 'index.html')}")
        if storage.exists(layout.metrics_file(root)):
            metrics = json.loads(storage.read_text(layout.metrics_file(root)))
            for method, result in [("irnet", metrics["irnet"]), *metrics.get("ablations", {}).items()]:
                aps = "  ".join(f"AP{int(float(t) * 100)} {v:.3f}" for t, v in result["ap"].items() if v is not None)
                miou = f"{result['miou']:.3f}" if result["miou"] is not None else "-"
                print(f"{method:>13}: mIoU {miou}  {aps}")
            if (metrics.get("cam_classification") or {}).get("images"):
                cls = metrics["cam_classification"]
                print(f"CAM classifier mAP on {cls['images']} held-out images: {cls['map']:.3f} (chance {cls['chance']:.3f}, "
                      f"skill {cam_skill(cls):.2f})")
        print(f"wall time: {state['last_run']['seconds']:.0f} s")
        return state


if __name__ == "__main__":
    main()
