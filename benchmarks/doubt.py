"""How well doubt ranks the labels of a finished run by their error against the ground truth.

    python benchmarks/doubt.py --root runs/demo

For every labelled image with ground truth: the doubt signals (pipeline.algorithms.doubt, with
IRNet's boundary map and the class scores of the semantic labels recomputed from the run's
network and CAMs, so a run labelled before doubt existed can be measured), the images' doubt
ranked among them, and each image's error 1 - mean IoU (over the classes in its labels or its ground truth). Prints Spearman's rank correlation of the error
with the doubt and with each signal alone. Measures; asserts nothing.

``--subsets K`` also ranks every combination of two or more signals (the mean of their percentile
ranks, as ``doubt.version_doubt``) by its worst lead, over the given runs, on the best single
signal of each run, and prints the K best: how ``doubt.COMBINED`` is chosen on runs that are not
the ones it is reported on (docs/review.md).

``--weightings`` also scores four ways of weighting the percentile ranks of every signal that
varies per run without ground truth (:func:`weighted_doubt`), tried as an alternative to a fixed
combination and not adopted (docs/review.md says why).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import label_tables, ledger, plan  # noqa: E402
from pipeline.algorithms import doubt  # noqa: E402
from pipeline.config import SynthesisConfig  # noqa: E402
from pipeline.data.images import read_inputs, read_label  # noqa: E402
from pipeline.io import codecs, layout, storage  # noqa: E402
from pipeline.models.store import load_trained  # noqa: E402
from pipeline.stages.cams import read_cam_rows  # noqa: E402
from pipeline.stages.evaluate import decode_instances  # noqa: E402
from pipeline.stages.synthesis import padded_input, semantic_scores  # noqa: E402


def image_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """1 - mean IoU over the classes (background included) present in either map."""
    valid = gt != 255
    ious = []
    for c in np.union1d(np.unique(pred[valid]), np.unique(gt[valid])):
        p, g = (pred == c) & valid, (gt == c) & valid
        ious.append((p & g).sum() / max((p | g).sum(), 1))
    return 1.0 - float(np.mean(ious))


def measure(root: str) -> dict:
    state = json.loads(storage.read_text(layout.run_json(root)))
    version = ledger.latest_version(root)
    labels_dir = layout.labels_dir(root, version)
    manifest_dir = layout.manifest_dir(root, state["manifest"]["stamp"])
    config = state["config"]
    index = label_tables.read_index(labels_dir).to_pylist()
    gt = {r["image_id"]: r for r in plan.read_manifest(manifest_dir, ["image_id", "gt_semantic_uri"]).to_pylist()}
    cams_key = state["stages"]["cams"]["key"]
    current = plan.current_cams(root, manifest_dir, state["manifest"]["classes"], cams_key)
    shard_of = dict(zip(current.column("image_id").to_pylist(), current.column("cam_shard").to_pylist()))
    instances: dict[str, list] = {}
    for uri in sorted({storage.resolve(r["instances_uri"], labels_dir) for r in index}):
        for row in codecs.read_parquet(uri).to_pylist():
            instances.setdefault(row["image_id"], []).append(row)
    irn = load_trained(root, "irn") if storage.exists(layout.model_file(root, "irn")) else None
    params = SynthesisConfig(**config["synthesis"])
    rows = []
    for row in index:
        image_id = row["image_id"]
        if not gt.get(image_id, {}).get("gt_semantic_uri") or image_id not in shard_of:
            continue
        semantic = read_label(storage.resolve(row["semantic_uri"], labels_dir))
        (cam_row,) = read_cam_rows(storage.join(layout.cams_dir(root), shard_of[image_id]), [image_id])
        size = semantic.shape
        masks, _, scores = decode_instances(sorted(instances.get(image_id, []), key=lambda r: r["instance_id"]), size)
        boundary = None
        if irn is not None:
            image, _ = read_inputs(row["uri"], max_pixels=config["data"]["max_pixels"])
            x = torch.from_numpy(padded_input(image, config["train_irn"]["crop_size"]))[None]
            with torch.no_grad():
                boundary = irn.infer_padded(x, [size])[0].boundary.numpy()
        class_ids = [int(c) for c in cam_row["class_ids"]]
        _, class_scores = semantic_scores(params.method, torch.from_numpy(np.asarray(cam_row["cams"], np.float32)), class_ids,
                                          size, None if boundary is None else torch.from_numpy(boundary), params)
        signals = doubt.image_signals(semantic, masks, scores, cam_row["cams"], class_ids, boundary, class_scores)
        rows.append({"image_id": image_id, **signals,
                     "error": image_error(semantic, read_label(gt[image_id]["gt_semantic_uri"]))})
    ranked = doubt.version_doubt(np.array([[r[name] for name in doubt.SIGNALS] for r in rows]))
    for row, value in zip(rows, ranked):
        row["doubt"] = float(value)
    error = [r["error"] for r in rows]
    correlations = {name: float(spearmanr([r[name] for r in rows], error).statistic)
                    for name in ("doubt",) + doubt.SIGNALS}
    return {"images": len(rows), "spearman": correlations, "rows": rows}


def subset_leads(results: list[dict]) -> list[tuple[float, tuple[str, ...], list[float]]]:
    """Every combination of two or more signals: (worst lead on the best single signal over the
    runs, the signals, its Spearman correlation per run), best first."""
    out = []
    for size in range(2, len(doubt.SIGNALS) + 1):
        for names in itertools.combinations(doubt.SIGNALS, size):
            rhos, leads = [], []
            for result in results:
                rows = result["rows"]
                ranked = doubt.version_doubt(np.array([[r[n] for n in doubt.SIGNALS] for r in rows]), combined=names)
                rho = float(spearmanr(ranked, [r["error"] for r in rows]).statistic)
                single = np.nanmax([result["spearman"][n] for n in doubt.SIGNALS])
                rhos.append(rho)
                leads.append(rho - single)
            out.append((min(leads), names, rhos))
    return sorted(out, key=lambda item: -np.nan_to_num(item[0], nan=-np.inf))


WEIGHTINGS = ("spectral", "agreement", "leave_one_out", "first_component")


def weighted_doubt(values: np.ndarray, how: str) -> np.ndarray:
    """A run's images' doubt as a weighted sum of the percentile ranks of the signals that vary,
    the weights read from the signals alone: ``spectral`` (the spectral meta-learner of Parisi et
    al., PNAS 2014: the leading eigenvector of the ranks' covariance with its diagonal refitted as
    rank one), ``agreement`` (each signal's mean correlation with the others, clipped at 0),
    ``leave_one_out`` (its correlation with the weighted sum of the others, iterated from equal
    weights, clipped at 0) or ``first_component`` (the first principal component)."""
    varying = [name for j, name in enumerate(doubt.SIGNALS) if np.ptp(values[:, j]) > 0]
    ranks = np.column_stack([doubt.version_doubt(values, combined=(name,)) for name in varying])  # percentile ranks
    cov = np.cov(ranks, rowvar=False)
    if how in ("spectral", "first_component"):
        diagonal = np.diag(cov).copy()
        for _ in range(100 if how == "spectral" else 1):
            fitted = cov - np.diag(np.diag(cov)) + np.diag(diagonal)
            eigenvalues, vectors = np.linalg.eigh(fitted)
            weights = vectors[:, -1] * np.sqrt(max(eigenvalues[-1], 0.0))
            diagonal = weights ** 2
        weights = weights if weights.sum() >= 0 else -weights
    elif how == "agreement":
        corr = np.corrcoef(ranks, rowvar=False)
        weights = np.clip((corr.sum(axis=1) - 1) / (len(corr) - 1), 0, None)
    else:
        weights = np.ones(ranks.shape[1])
        for _ in range(10):
            rest = [ranks[:, np.arange(len(weights)) != j] @ np.delete(weights, j) for j in range(len(weights))]
            weights = np.array([max(np.corrcoef(ranks[:, j], r)[0, 1], 0.0) if np.ptp(r) > 0 else 0.0
                                for j, r in enumerate(rest)])
    return ranks @ weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, action="append", help="run root of a finished run (repeatable)")
    p.add_argument("--subsets", type=int, default=0, help="print the K best combinations of signals")
    p.add_argument("--weightings", action="store_true", help="also score the per-run weightings")
    args = p.parse_args()
    torch.set_num_threads(2)
    results = []
    for root in args.root:
        results.append(measure(root))
        print(f"{root}: {results[-1]['images']} images with ground truth; Spearman rank correlation with 1 - mIoU")
        for name, value in results[-1]["spearman"].items():
            print(f"  {name:<15} {value:+.3f}")
    if args.weightings:
        print("per-run weightings: Spearman per run, worst lead on the best single signal")
        values = [np.array([[r[n] for n in doubt.SIGNALS] for r in result["rows"]]) for result in results]
        errors = [[r["error"] for r in result["rows"]] for result in results]
        best = [np.nanmax([result["spearman"][n] for n in doubt.SIGNALS]) for result in results]
        for how in WEIGHTINGS:
            rhos = [float(spearmanr(weighted_doubt(v, how), e).statistic) for v, e in zip(values, errors)]
            leads = [rho - b for rho, b in zip(rhos, best)]
            print(f"  {how:<16} {' '.join(f'{r:+.3f}' for r in rhos)}  worst lead {min(leads):+.3f}")
    if args.subsets:
        print(f"combinations by their worst lead on the best single signal ({', '.join(args.root)}):")
        for lead, names, rhos in subset_leads(results)[:args.subsets]:
            print(f"  {lead:+.3f}  {' '.join(f'{r:+.3f}' for r in rhos)}  {'+'.join(names)}")


if __name__ == "__main__":
    main()
