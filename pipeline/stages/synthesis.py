"""Stage: IRNet inference + label synthesis (Sec. 5) of the images a labels version still needs.

The Ray Data graph: a task per CAM shard reads the CAM rows of its pending images; CPU tasks
decode, normalise and zero-pad each image to the IRNet training crop (as the official inference
does, so GroupNorm sees what it saw in training); network actors (GPU when
``synthesis.gpus_per_actor`` > 0) run IRNet on batches of equally padded images; CPU tasks run the
random walk, the instance grouping, and write the semantic PNG (VOC palette) and the 16-bit
instance-id PNG; shard writers commit ``run.shard_rows`` images at a time (``label_tables.commit_labels``).
Methods: ``irnet`` (the paper), ``cam_boundary`` (no displacement) and ``cam`` (threshold +
components) for the ablations of Table 1.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline import label_tables, ledger, plan, quarantine, tasks
from pipeline.algorithms import doubt
from pipeline.algorithms import synthesis as algo
from pipeline.config import Config, SynthesisConfig
from pipeline.data.images import read_inputs, unreadable_reason
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage
from pipeline.models.store import load_trained
from pipeline.progress import StageProgress
from pipeline.stages import coco
from pipeline.stages.cams import pick_device, read_cam_rows

log = logging.getLogger(__name__)
STAGE = "synthesis"


def grouping_args(params: SynthesisConfig) -> dict[str, Any]:
    """The instance-grouping keywords of ``instance_labels`` / ``instance_sweep`` from the config."""
    return {"iterations": params.centroid_iterations, "threshold": params.centroid_threshold,
            "min_fragment": params.min_fragment, "grouping": params.grouping, "sigma": params.density_sigma}


def semantic_scores(method: str, cams: torch.Tensor, class_ids: list[int], image_size: tuple[int, int],
                    boundary: torch.Tensor | None, params: SynthesisConfig) -> tuple[np.ndarray, np.ndarray]:
    """Semantic map uint8 [H, W] by ``method`` and the float32 [K + 1, H, W] class scores it was
    chosen from (background first; the walked CAMs, or the raw ones for ``cam``)."""
    if method == "cam":
        return algo.cam_semantic_scores(cams, class_ids, image_size, bg_threshold=params.cam_bg_threshold)
    return algo.semantic_scores(cams, class_ids, boundary, image_size, bg_threshold=params.sem_bg_threshold,
                                beta=params.beta, steps=params.steps, radius=params.radius)


def synthesize(method: str, cams: np.ndarray, class_ids: list[int], image_size: tuple[int, int],
               boundary: torch.Tensor | None, displacement: torch.Tensor | None, params: SynthesisConfig,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Semantic map uint8 [H, W], its class scores (:func:`semantic_scores`) and instances (masks
    bool [N, H, W], classes, scores) by ``method``."""
    walk = {"beta": params.beta, "steps": params.steps, "radius": params.radius}
    cams_t = torch.from_numpy(np.array(cams, dtype=np.float32))
    if boundary is not None:
        cams_t = cams_t.to(boundary.device)
    semantic, class_scores = semantic_scores(method, cams_t, class_ids, image_size, boundary, params)
    if method == "cam":
        instances = algo.cam_instance_labels(cams_t, class_ids, image_size, bg_threshold=params.cam_bg_threshold,
                                             min_fragment=params.min_fragment)
    elif method == "cam_boundary":
        instances = algo.cam_boundary_instance_labels(cams_t, class_ids, boundary, image_size,
                                                      bg_threshold=params.ins_bg_threshold,
                                                      min_fragment=params.min_fragment, **walk)
    else:
        instances = algo.instance_labels(cams_t, class_ids, boundary, displacement, image_size,
                                         bg_threshold=params.ins_bg_threshold, **grouping_args(params), **walk)
    return (semantic, class_scores, *instances)


def instance_id_map(masks: np.ndarray, scores: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """uint16 [H, W] of instance ids 1..N (mask i -> id i + 1); higher scores drawn on top."""
    ids = np.zeros(image_size, np.uint16)
    for i in np.argsort(scores, kind="stable"):
        ids[masks[i]] = i + 1
    return ids


def instance_rows(image_id: str, masks: np.ndarray, classes: np.ndarray, scores: np.ndarray,
                  doubts: np.ndarray | None = None) -> list[dict]:
    """One COCO-style record per instance: RLE, area, bbox [x, y, w, h], score, doubt."""
    rows = []
    for i, mask in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rows.append({"image_id": image_id, "instance_id": i + 1, "class_id": int(classes[i]),
                     "score": float(scores[i]), "area": int(mask_utils.area(rle)),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "rle_counts": rle["counts"].decode("ascii"),
                     "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                     "doubt": None if doubts is None else float(doubts[i])})
    return rows


def read_pending_cams(batch: dict[str, np.ndarray], *, root: str, block: int) -> Iterator[dict[str, Any]]:
    """Task per CAM shard: the CAM rows of its pending images, with the uri the manifest gives now
    (the file may have moved since its CAMs were made), in batches of ``block``."""
    for shard, ids, uris, keys in zip(batch["cam_shard"], batch["image_ids"], batch["uris"], batch["label_keys"]):
        wanted = {str(i): (str(u), str(k)) for i, u, k in zip(ids, uris, keys)}
        rows = read_cam_rows(storage.join(layout.cams_dir(root), str(shard)), sorted(wanted))
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            yield {"image_id": np.array([r["image_id"] for r in part], dtype=object),
                   "uri": np.array([wanted[r["image_id"]][0] for r in part], dtype=object),
                   "label_key": np.array([wanted[r["image_id"]][1] for r in part], dtype=object),
                   "height": np.array([r["height"] for r in part], np.int32),
                   "width": np.array([r["width"] for r in part], np.int32),
                   "class_ids": tasks.object_array([np.asarray(r["class_ids"], np.int32) for r in part]),
                   "cams": tasks.object_array([r["cams"] for r in part])}


def padded_input(image: np.ndarray, pad_to: int) -> np.ndarray:
    """float32 [3, max(H, pad_to), max(W, pad_to)]: normalised, zero-padded bottom/right."""
    x = normalize(image)
    height, width = image.shape[:2]
    out = np.zeros((3, max(height, pad_to), max(width, pad_to)), np.float32)
    out[:, :height, :width] = x
    return out


def decode_for_irn(batch: dict[str, np.ndarray], *, max_pixels: int, pad_to: int) -> dict[str, Any]:
    """CPU task: decode each image, check it against its CAMs, normalise and pad it (or an error)."""
    inputs, errors = [], []
    for uri, height, width in zip(batch["uri"], batch["height"], batch["width"]):
        x, error = _EMPTY, ""
        try:
            image, _ = read_inputs(uri, max_pixels=max_pixels)
            if image.shape[:2] != (int(height), int(width)):
                raise ValueError(f"image is {image.shape[:2]} but its CAMs were made for {(int(height), int(width))}")
            x = padded_input(image, pad_to)
        except Exception as err:  # noqa: BLE001
            error = f"synthesis failed ({unreadable_reason(err, 'decoding')})"
        inputs.append(x)
        errors.append(error)
    return {**batch, "input": tasks.object_array(inputs), "error": np.array(errors, dtype=object)}


_EMPTY = np.zeros((0, 0, 0), np.float32)


class IrnNetwork:
    """Actor: IRNet, loaded once; boundary and displacement maps of batches of padded images."""

    def __init__(self, *, root: str, gpus: float, bf16: bool):
        self.device = pick_device(gpus)
        self.model = load_trained(root, "irn").to(self.device)
        self.bf16 = bf16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["image_id"])
        boundary: list[Any] = [_EMPTY] * n
        displacement: list[Any] = [_EMPTY] * n
        errors = list(batch["error"])
        by_shape: dict[tuple, list[int]] = {}
        for i in range(n):
            if not errors[i]:
                by_shape.setdefault(batch["input"][i].shape, []).append(i)
        for members in by_shape.values():
            try:
                x = torch.from_numpy(np.stack([batch["input"][i] for i in members])).to(self.device)
                sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in members]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16 and self.device.type == "cuda"):
                    results = self.model.infer_padded(x, sizes)
                for i, result in zip(members, results):
                    boundary[i] = result.boundary.float().cpu().numpy()
                    displacement[i] = result.displacement.float().cpu().numpy()
            except Exception as err:  # noqa: BLE001
                log.exception("IRNet failed on a batch")
                for i in members:
                    errors[i] = f"synthesis failed ({unreadable_reason(err, 'IRNet inference')})"
        out = {k: v for k, v in batch.items() if k != "input"}
        return {**out, "boundary": tasks.object_array(boundary), "displacement": tasks.object_array(displacement),
                "error": np.array(errors, dtype=object)}


def label_and_write(batch: dict[str, np.ndarray], *, labels_dir: str, method: str,
                    params: dict[str, Any]) -> dict[str, Any]:
    """CPU task: labels of each image by ``method``; writes its PNGs; emits its index row fields
    and instance rows as JSON (or an error)."""
    section = SynthesisConfig(**params)
    n = len(batch["image_id"])
    errors = list(batch["error"]) if "error" in batch else [""] * n
    rows: list[Any] = [None] * n
    for i in range(n):
        if errors[i]:
            continue
        image_id, size = str(batch["image_id"][i]), (int(batch["height"][i]), int(batch["width"][i]))
        try:
            boundary = displacement = None
            if method != "cam":
                boundary = torch.from_numpy(batch["boundary"][i])
                displacement = torch.from_numpy(batch["displacement"][i])
            cams, class_ids = batch["cams"][i], [int(c) for c in batch["class_ids"][i]]
            semantic, class_scores, masks, classes, scores = synthesize(method, cams, class_ids, size, boundary,
                                                                        displacement, section)
            storage.write_bytes(layout.semantic_png(labels_dir, image_id), codecs.encode_semantic_png(semantic))
            storage.write_bytes(layout.instance_png(labels_dir, image_id),
                                codecs.encode_instance_png(instance_id_map(masks, scores, size)))
        except Exception as err:  # noqa: BLE001 - one bad image must not fail the block
            log.exception("synthesis failed for %s", image_id)
            errors[i] = f"synthesis failed ({unreadable_reason(err, 'labelling')})"
            continue
        foreground = (semantic != 0) & (semantic != 255)
        cam_area = float((cams.max(axis=0) > section.cam_bg_threshold).mean()) if len(cams) else 0.0
        grid = None if boundary is None else boundary.float().cpu().numpy()
        signals = doubt.image_signals(semantic, masks, scores, cams, class_ids, grid, class_scores)
        instance_doubts, _, _ = doubt.instance_doubt(masks, scores, grid)
        rows[i] = json.dumps(({"image_id": image_id, "key": str(batch["label_key"][i]), "uri": str(batch["uri"][i]),
                    "height": size[0], "width": size[1], "class_ids": class_ids, "num_instances": len(masks),
                    "semantic_uri": f"semantic/{image_id}.png", "instance_uri": f"instance/{image_id}.png",
                    "instances_uri": None, "fg_fraction": float(foreground.mean()), "cam_fraction": cam_area,
                    **{f"doubt_{name}": value for name, value in signals.items()}},
                   instance_rows(image_id, masks, classes, scores, instance_doubts)))
    return {"image_id": batch["image_id"], "uri": batch["uri"], "label_key": batch["label_key"],
            "labels": np.array([r or "" for r in rows], dtype=object), "error": np.array(errors, dtype=object)}


def commit_shard(batch: dict[str, np.ndarray], *, root: str, labels_dir: str, stage: str) -> dict[str, np.ndarray]:
    """CPU task: commit a shard's worth of labelled images, and the quarantine rows of the rest."""
    images, instances, failed, statuses = [], [], [], []
    for i, image_id in enumerate(batch["image_id"]):
        if batch["error"][i]:
            failed.append({"image_id": str(image_id), "uri": str(batch["uri"][i]), "reason": str(batch["error"][i]),
                           "key": str(batch["label_key"][i])})
            statuses.append("quarantined")
            continue
        image, rows = json.loads(batch["labels"][i])
        images.append(image)
        instances += rows
        statuses.append("done")
    quarantine.write_quarantine(root, stage, failed)
    label_tables.commit_labels(labels_dir, images, instances, coco.coco_part(instances))
    return tasks.status_batch(statuses)


def run_synthesis(cfg: Config, manifest_dir: str, classes: list[str], cams_key: str, synthesis_key: str,
                  labels_dir: str, base_dir: str | None, *, method: str | None = None, stage: str = STAGE,
                  ground_truth_only: bool = False) -> dict[str, Any]:
    """Label into ``labels_dir`` every image the version still needs (ledger.plan_synthesis)."""
    import ray.data

    root, section = cfg.run.root, cfg.synthesis
    method = method or section.method
    t0 = time.perf_counter()
    pending_ref, counts_ref = tasks.run_task(
        plan.synthesis_plan, root, manifest_dir, classes, cams_key, synthesis_key, labels_dir, base_dir,
        stage=stage, ground_truth_only=ground_truth_only, num_returns=2, num_cpus=cfg.run.io_cpus)
    counts = {**tasks.get(counts_ref), "plan_seconds": round(time.perf_counter() - t0, 2)}
    if counts["pending"] == 0:
        return counts
    block = min(max(8, section.batch_size), cfg.run.shard_rows)
    ds = tasks.dataset(pending_ref, 1).map_batches(
        read_pending_cams, batch_size=1, batch_format="numpy", num_cpus=cfg.run.io_cpus,
        fn_kwargs={"root": root, "block": block})
    if method != "cam":
        ds = ds.map_batches(
            decode_for_irn, batch_size=block, batch_format="numpy", num_cpus=cfg.run.io_cpus,
            fn_kwargs={"max_pixels": cfg.data.max_pixels, "pad_to": cfg.train_irn.crop_size},
        ).map_batches(
            IrnNetwork, batch_size=section.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"root": root, "gpus": section.gpus_per_actor, "bf16": section.bf16},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=section.num_actors),
            num_cpus=section.cpus_per_actor, num_gpus=section.gpus_per_actor)
    ds = ds.map_batches(
        label_and_write, batch_size=block, batch_format="numpy", num_cpus=section.cpus_per_task,
        fn_kwargs={"labels_dir": labels_dir, "method": method, "params": vars(section)},
    ).map_batches(
        commit_shard, batch_size=tasks.shard_batch(cfg.run.shard_rows, block), batch_format="numpy",
        num_cpus=cfg.run.io_cpus, fn_kwargs={"root": root, "labels_dir": labels_dir, "stage": stage})
    progress = StageProgress(stage, counts["pending"], every_seconds=cfg.run.progress_seconds)
    counts.update(tasks.summarise(ds, progress))
    tasks.finish_stage(*(storage.join(labels_dir, sub) for sub in ("semantic", "instance", "instances", "images")),
                        layout.quarantine_dir(root))
    return counts


def stage_synthesis(run: ledger.Run) -> dict[str, Any]:
    """Label what the next labels version needs (ledger.begin_version / plan_synthesis)."""
    key = run.synthesis_key()
    pending = ledger.begin_version(run.state, run.root, key, forced=run.forced(STAGE))
    ledger.record_pending(run.state, pending)
    version, base = pending["name"], pending["base"]
    base_dir = layout.labels_dir(run.root, base) if base else None
    counts = run_synthesis(run.cfg, run.manifest_dir, run.classes, run.recorded_cams_key(), key,
                           layout.labels_dir(run.root, version), base_dir)
    if not ledger.version_needed(run.state, pending, labelled=counts["pending"], removed=counts["removed"],
                                 corrected=counts["corrected"]):
        return {**counts, "_skipped": True, "version": base}
    return {**counts, "version": version}
