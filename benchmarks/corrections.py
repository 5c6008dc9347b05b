"""What people's corrections buy: this script plays the annotator on a finished run whose
manifest has ground truth, and measures the labels before and after.

    python benchmarks/corrections.py --root runs/demo -- --config configs/demo.yaml [--set K=V ...]

(after ``--``: the jobs.label arguments the run was made with). Two questions, on copies of the
run root under ``--work``, the ground truth going in through jobs.correct as a VOC folder:

* Corrected by hand, nothing retrained: the ``--fraction`` of images most in doubt (as jobs.review
  ranks them) against ``--draws`` random choices of as many images, scored over the whole set
  (computed from per-image confusion matrices and AP records; the doubt-ranked choice is also run
  through jobs.correct + jobs.label with ``run.retrain=never``, which must give the same numbers).
* Retrained: per ``--seeds`` seed, IRNet retrained (``run.retrain=auto``) with the corrections of
  the doubt-ranked choice and of one random choice, and without corrections (the control,
  ``--from-stage train_irn``); every uncorrected image relabelled; scored on the images each
  choice left uncorrected. A seed's control shows how far retraining alone moves the numbers.

Prints Markdown tables; ``--json`` also writes the result. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import correct, label  # noqa: E402
from pipeline import label_tables, ledger, plan  # noqa: E402
from pipeline.algorithms.metrics import MaskAPAccumulator, confusion, image_records, mean_iou  # noqa: E402
from pipeline.data.images import read_label  # noqa: E402
from pipeline.io import codecs, layout, storage  # noqa: E402
from pipeline.stages.evaluate import decode_instances, gt_instances  # noqa: E402
from pipeline.stages.review import ranking  # noqa: E402

GT_COLUMNS = ["image_id", "gt_semantic_uri", "gt_instance_uri", "gt_instance_classes"]


def _state(root: str) -> dict:
    return json.loads(storage.read_text(layout.run_json(root)))


def ground_truth(root: str) -> dict[str, dict]:
    state = _state(root)
    manifest_dir = layout.manifest_dir(root, state["manifest"]["stamp"])
    rows = plan.read_manifest(manifest_dir, GT_COLUMNS).to_pylist()
    return {r["image_id"]: r for r in rows if r["gt_semantic_uri"] and r["gt_instance_uri"]}


def choose(root: str, truth: dict[str, dict], fraction: float, how: str, seed: int) -> list[str]:
    """The images to correct: ceil(fraction x the version's images with ground truth), the most in
    doubt first (jobs.review's order) or a seeded random sample."""
    ranked_table = ranking(layout.labels_dir(root, ledger.latest_version(root)))
    if how == "doubt" and ranked_table.column("doubt").null_count == ranked_table.num_rows:
        raise SystemExit(f"{root}: its latest version has no doubt (labelled before doubt existed); "
                         "relabel it first: jobs.label ... --from-stage synthesis")
    ranked = [i for i in ranked_table.column("image_id").to_pylist() if i in truth]
    count = max(1, math.ceil(fraction * len(ranked)))
    if how == "doubt":
        return ranked[:count]
    return sorted(np.random.default_rng(seed).choice(sorted(ranked), count, replace=False).tolist())


def write_voc(truth: dict[str, dict], ids: list[str], out: Path) -> Path:
    """The ground truth of ``ids`` as the VOC folder jobs.correct takes."""
    for folder, column in (("SegmentationClass", "gt_semantic_uri"), ("SegmentationObject", "gt_instance_uri")):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            (out / folder / f"{image_id}.png").write_bytes(storage.read_bytes(truth[image_id][column]))
    return out


def image_parts(root: str, truth: dict[str, dict], classes: list[str], *, perfect: bool = False) -> dict[str, tuple]:
    """Per image of the latest version with ground truth: its confusion matrix and AP50 records
    (pipeline.algorithms.metrics), of its labels or, ``perfect``, of its ground truth itself (what
    a correction that copies the ground truth gives it)."""
    labels_dir = layout.labels_dir(root, ledger.latest_version(root))
    index = [r for r in label_tables.read_index(labels_dir).to_pylist() if r["image_id"] in truth]
    shards: dict[str, dict[str, list[dict]]] = {}
    parts = {}
    for row in index:
        gt = truth[row["image_id"]]
        gt_semantic = read_label(gt["gt_semantic_uri"])
        gt_masks, gt_classes = gt_instances(read_label(gt["gt_instance_uri"]), list(gt["gt_instance_classes"] or []),
                                            classes)
        if perfect:
            parts[row["image_id"]] = (confusion(gt_semantic, gt_semantic, len(classes) + 1), image_records(
                gt_masks, gt_classes, np.ones(len(gt_classes)), gt_masks, gt_classes, iou_thresholds=[0.5]))
            continue
        if row["instances_uri"] not in shards:
            shards[row["instances_uri"]] = {}
            for instance in codecs.read_parquet(storage.resolve(row["instances_uri"], labels_dir)).to_pylist():
                shards[row["instances_uri"]].setdefault(instance["image_id"], []).append(instance)
        pred = read_label(storage.resolve(row["semantic_uri"], labels_dir))
        instances = sorted(shards[row["instances_uri"]].get(row["image_id"], []), key=lambda r: r["instance_id"])
        parts[row["image_id"]] = (confusion(pred, gt_semantic, len(classes) + 1), image_records(
            *decode_instances(instances, pred.shape), gt_masks, gt_classes, iou_thresholds=[0.5]))
    return parts


def combine(parts: dict[str, tuple], ids) -> dict:
    """mIoU and mask AP50 over the images ``ids`` (in id order) of :func:`image_parts`."""
    ids = sorted(ids)
    matrix = sum(parts[i][0] for i in ids)
    ap = MaskAPAccumulator(iou_thresholds=[0.5])
    for i in ids:
        ap.extend(*parts[i][1])
    return {"images": len(ids), "miou": mean_iou(matrix)["mean"], "ap50": ap.result()[0.5]["mean"]}


def corrected_by_hand(base: dict[str, tuple], perfect: dict[str, tuple], ids) -> dict:
    """What correcting ``ids`` with their ground truth gives the whole set when nothing retrains."""
    return combine({**base, **{i: perfect[i] for i in ids}}, base)


def random_draws(base: dict[str, tuple], perfect: dict[str, tuple], count: int, draws: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [corrected_by_hand(base, perfect, rng.choice(sorted(base), count, replace=False)) for _ in range(draws)]


def relabel(base: str, root: Path, label_args: list[str], *, seed: int, ids: list[str] = (),
            truth: dict[str, dict] | None = None, retrain: str = "auto") -> str:
    """A copy of run ``base`` at ``root``: ``ids`` corrected with their ground truth (a VOC
    folder, jobs.correct), then jobs.label with ``run.seed`` and ``run.retrain``; without ``ids``
    IRNet is retrained from the same labels (``--from-stage train_irn``): the control."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root / "run")
    run = str(root / "run")
    if ids:
        correct.main(["--root", run, "--from", str(write_voc(truth, ids, root / "voc")),
                      "--note", "benchmarks/corrections.py: ground truth"])
    label.main(label_args + ["--set", f"run.root={run}", "--set", f"run.seed={seed}", "--set", f"run.retrain={retrain}"]
               + ([] if ids else ["--from-stage", "train_irn"]))
    return run


def measure(root: str, label_args: list[str], *, work: Path, fraction: float = 0.1, seeds: tuple[int, ...] = (0,),
            draws: int = 200) -> dict:
    """The whole measurement (docs/review.md): ``by_hand`` (doubt-ranked vs random corrections,
    nothing retrained: computed from the per-image parts, and checked once through jobs.label),
    and ``retrain`` rows per seed: IRNet retrained with the corrections of the doubt-ranked and of
    one random choice, and without corrections (the control), each scored on the uncorrected
    images of both choices."""
    label.main(label_args + ["--set", f"run.root={root}"])  # the run is current (a no-op when it is)
    truth = ground_truth(root)
    classes = _state(root)["manifest"]["classes"]
    chosen = {"doubt": choose(root, truth, fraction, "doubt", 0), "random": choose(root, truth, fraction, "random", 0)}
    base, perfect = image_parts(root, truth, classes), image_parts(root, truth, classes, perfect=True)
    count = len(chosen["doubt"])
    stuck = relabel(root, work / "stick", label_args, seed=0, ids=chosen["doubt"], truth=truth, retrain="never")
    out = {"images": len(base), "corrected": count, "before": combine(base, base),
           "by_hand": {"doubt": corrected_by_hand(base, perfect, chosen["doubt"]),
                       "doubt_through_jobs": combine(image_parts(stuck, truth, classes), base),
                       "random": random_draws(base, perfect, count, draws, 1)},
           "retrain": []}
    for seed in seeds:
        for arm in ("control", "doubt", "random"):
            run = relabel(root, work / f"{arm}-{seed}", label_args, seed=seed, ids=chosen.get(arm, []), truth=truth)
            parts = image_parts(run, truth, classes)
            out["retrain"].append({"seed": seed, "arm": arm, "all": combine(parts, parts), **{
                f"uncorrected_{how}": combine(parts, set(parts) - set(ids)) for how, ids in chosen.items()}})
    return out


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(result: dict) -> list[str]:
    by_hand, count = result["by_hand"], result["corrected"]
    random = by_hand["random"]
    lines = [f"Corrected by hand, nothing retrained ({count} of {result['images']} images; random: "
             f"mean ± sd over {len(random)} draws, and the share of draws the doubt-ranked choice beats):", "",
             "| choice | mIoU | mask AP50 |", "|---|---:|---:|",
             f"| none | {result['before']['miou']:.3f} | {result['before']['ap50']:.3f} |",
             f"| doubt-ranked | {by_hand['doubt']['miou']:.3f} | {by_hand['doubt']['ap50']:.3f} |",
             f"| doubt-ranked, through jobs.correct + jobs.label | {by_hand['doubt_through_jobs']['miou']:.3f} | "
             f"{by_hand['doubt_through_jobs']['ap50']:.3f} |",
             f"| random | {_mean_sd([r['miou'] for r in random])} | {_mean_sd([r['ap50'] for r in random])} |",
             "| doubt beats random in | " + " | ".join(
                 f"{np.mean([by_hand['doubt'][k] > r[k] for r in random]):.0%}" for k in ("miou", "ap50")) + " |",
             "", "IRNet retrained (run.retrain=auto), every uncorrected image relabelled; scored on the images "
             "each choice left uncorrected:", "",
             "| seed | IRNet trained with | mIoU all | AP50 all | mIoU / AP50 on doubt's uncorrected | "
             "mIoU / AP50 on random's uncorrected |", "|---|---|---:|---:|---:|---:|"]
    for r in result["retrain"]:
        lines.append(f"| {r['seed']} | {r['arm']} | {r['all']['miou']:.3f} | {r['all']['ap50']:.3f} | "
                     f"{r['uncorrected_doubt']['miou']:.3f} / {r['uncorrected_doubt']['ap50']:.3f} | "
                     f"{r['uncorrected_random']['miou']:.3f} / {r['uncorrected_random']['ap50']:.3f} |")
    for arm in ("doubt", "random"):
        lifts = [r[f"uncorrected_{arm}"]["ap50"] - c[f"uncorrected_{arm}"]["ap50"]
                 for r in result["retrain"] if r["arm"] == arm
                 for c in result["retrain"] if c["arm"] == "control" and c["seed"] == r["seed"]]
        if lifts:
            lines.append(f"\nAP50 lift on {arm}'s uncorrected images over the control, per seed: "
                         + ", ".join(f"{v:+.3f}" for v in lifts) + f" (mean {np.mean(lifts):+.3f})")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a finished run whose manifest has ground truth")
    p.add_argument("--work", default=None, help="where the copies go (default: <root>-corrections)")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run.seed of the retrainings")
    p.add_argument("--draws", type=int, default=200, help="random choices scored without retraining")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv[:split])
    result = measure(args.root, argv[split + 1:], work=Path(args.work or f"{args.root.rstrip('/')}-corrections"),
                     fraction=args.fraction, seeds=tuple(args.seeds), draws=args.draws)
    print("\n".join(table(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
