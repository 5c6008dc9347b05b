"""Train Mask R-CNN or DeepLab on a labels version and evaluate it (paper Sec. 6.3-6.4):
``python -m jobs.train_segmenter --config FILE [--version V] --set segmenter.model=deeplab|maskrcnn
[--set segmenter.labels=pseudo|ground_truth|both]``.

``pseudo`` trains on the version's labels (LATEST by default), ``ground_truth`` on the manifest's
ground truth (the upper bound), ``both`` one after the other; each is evaluated on the held-out
images that have ground truth, and the report shows them side by side with their ratio.
"""

from __future__ import annotations

from jobs import _cli
from pipeline.downstream import run_segmenters


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict:
    p = _cli.parser(__doc__)
    p.add_argument("--version", help="labels version (default: LATEST)")
    args = p.parse_args(argv)
    with _cli.job(args) as cfg:
        result = run_segmenters(cfg, version=args.version)
    print(f"segmenters on labels {result['version']}, evaluated on {result['evaluated_on']} held-out images:")
    print(f"{'model':<11} {'metric':<8} {'pseudo':>8} {'truth':>8} {'ratio':>7}")
    for model, metric, pseudo, truth, ratio in result["table"]:
        print(f"{model:<11} {metric:<8} {_fmt(pseudo):>8} {_fmt(truth):>8} {_fmt(ratio):>7}")
    return result


if __name__ == "__main__":
    main()
