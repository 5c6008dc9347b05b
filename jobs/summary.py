"""What a labelled run measured, in one short table: ``python -m jobs.summary --root R``.

The method's ablation against the ground truth (CAM only, CAM + boundary, IRNet: mIoU, mask AP50,
AP70; the paper's Tables 1-2), the segmenters trained on the pseudo labels next to the same model
trained on the ground truth (Tables 3-4), and where the report is. Reads ``report/metrics.json``;
starts no Ray. ``make demo`` ends with it.
"""

from __future__ import annotations

import argparse
import json

from pipeline.io import layout, storage
from pipeline.report.content import comparison_rows

METHODS = (("CAM only", ("ablations", "cam")), ("CAM + boundary", ("ablations", "cam_boundary")),
           ("IRNet", ("irnet",)))


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary(root: str) -> str:
    """The table text of run root ``root`` (a line saying so when nothing was evaluated)."""
    if not storage.exists(layout.metrics_file(root)):
        return f"{root}: no evaluation yet (report/metrics.json is written when the manifest has ground truth)"
    metrics = json.loads(storage.read_text(layout.metrics_file(root)))
    lines = [f"labels {metrics.get('labels_version')} against the ground truth"
             f" ({((metrics.get('irnet') or {}).get('images') or {}).get('semantic', '?')} images):",
             f"  {'method':<16} {'mIoU':>6} {'AP50':>6} {'AP70':>6}"]
    for name, path in METHODS:
        result = metrics
        for key in path:
            result = (result or {}).get(key)
        if result:
            ap = result.get("ap", {})
            lines.append(f"  {name:<16} {_cell(result.get('miou')):>6} {_cell(ap.get('0.5')):>6} "
                         f"{_cell(ap.get('0.7')):>6}")
    rows = comparison_rows(metrics.get("segmenters") or {})
    if rows:
        held_out = max(((r.get("metrics") or {}).get("images") or 0) for r in metrics["segmenters"].values())
        lines += ["", f"segmenters trained on the pseudo labels vs on the ground truth ({held_out} held-out images):",
                  f"  {'model':<11} {'metric':<8} {'pseudo':>7} {'truth':>7} {'ratio':>6}"]
        lines += [f"  {model:<11} {metric:<8} {_cell(pseudo):>7} {_cell(truth):>7} {_cell(ratio):>6}"
                  for model, metric, pseudo, truth, ratio in rows]
    lines += ["", f"report: {storage.join(layout.report_dir(root), 'index.html')}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="run root (local path or URI)")
    text = summary(parser.parse_args(argv).root)
    print(text)
    return text


if __name__ == "__main__":
    main()
