"""Stage: CAMs (Eq. 1) and CRF relation mining (Sec. 4.2) for the images that need them.

The Ray Data graph is shaped for GPUs: CPU tasks decode, resize and normalise; network actors
(GPU when ``cams.gpus_per_actor`` > 0) only run the CAM network on batches; CPU tasks fuse the
scales, run the CRF and write the relation PNG (with ``cams.source``, a CPU task reads each
image's CAMs from the source instead of the network); shard writers commit ``cams/part-*.parquet``
(image_id, key, uri, height, width, class_ids, stride-4 CAMs in float16) ``run.shard_rows``
images at a time. Images that fail become quarantine rows of stage ``cams`` (ledger).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import ledger, plan, quarantine, tasks
from pipeline.algorithms.cams import make_cams
from pipeline.algorithms.relations import mine_relations
from pipeline.config import Config
from pipeline.data.images import read_inputs, unreadable_reason
from pipeline.data.source_cams import SourceCamError, fit_source_cams, read_source_cams
from pipeline.data.transforms import normalize, resize_image, scaled_size
from pipeline.io import codecs, layout, storage
from pipeline.models.store import load_trained
from pipeline.progress import StageProgress

log = logging.getLogger(__name__)
STAGE = "cams"
ROW_GROUP = 64  # rows per Parquet row group of a CAM shard: synthesis reads a few images at a time


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def scaled_inputs(image: np.ndarray, scales: list[float]) -> list[np.ndarray]:
    """Network inputs of Eq. 1: the image at each scale (bicubic), normalised, float32 [3, h, w]."""
    height, width = image.shape[:2]
    return [normalize(resize_image(image, scaled_size(height, width, s))) for s in scales]


def decode_for_cams(batch: dict[str, np.ndarray], *, scales: list[float], max_pixels: int) -> dict[str, Any]:
    """CPU task: read and decode each image and make its multi-scale inputs ``input_<s>`` (or an
    error; failed rows carry empty arrays of the same rank, so every column stays a tensor column)."""
    images, inputs, errors = [], [[] for _ in scales], []
    for image_id, uri in zip(batch["image_id"], batch["uri"]):
        image, scaled, error = np.zeros((0, 0, 3), np.uint8), [_EMPTY] * len(scales), ""
        try:
            image, _ = read_inputs(uri, max_pixels=max_pixels)
            scaled = scaled_inputs(image, scales)
        except Exception as err:  # noqa: BLE001 - one bad image must not fail the block
            error = unreadable_reason(err, "decoding")
        images.append(image)
        for s, x in enumerate(scaled):
            inputs[s].append(x)
        errors.append(error)
    return {**batch, "image": tasks.object_array(images), "error": np.array(errors, dtype=object),
            **{f"input_{s}": tasks.object_array(x) for s, x in enumerate(inputs)}}


@torch.no_grad()
def class_maps(model: torch.nn.Module, inputs: list[list[np.ndarray]], class_ids: list[np.ndarray],
               device: torch.device, bf16: bool) -> list[list[np.ndarray]]:
    """ReLU'd class maps of each image at each scale, for its tagged classes: float32 [2, K, hs, ws]
    (index 1 from the flipped input, still flipped). Inputs of equal shape run as one batch."""
    out: list[list[np.ndarray | None]] = [[None] * len(x) for x in inputs]
    for scale in range(max((len(x) for x in inputs), default=0)):
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            if len(x) > scale:
                by_shape.setdefault(x[scale].shape, []).append(i)
        for members in by_shape.values():
            x = torch.from_numpy(np.stack([inputs[i][scale] for i in members])).to(device)
            x = torch.cat([x, x.flip(-1)])  # images, then their flips
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                maps = model.cam_maps(x).float()
            n = len(members)
            for k, i in enumerate(members):
                tagged = torch.as_tensor(np.asarray(class_ids[i], np.int64) - 1, device=device)
                pair = torch.stack([maps[k], maps[n + k]]).index_select(1, tagged)
                out[i][scale] = pair.cpu().numpy()
    return out


def multiscale_cams(model: torch.nn.Module, image: np.ndarray, class_ids: list[int], scales: list[float],
                    device: torch.device, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 for one image (uint8 [H, W, 3]): (stride-4 CAMs [K, h, w], full-resolution [K, H, W]),
    by the same steps the stage's tasks and actors take."""
    (maps,) = class_maps(model, [scaled_inputs(image, scales)], [np.asarray(class_ids)], device, bf16)
    outputs = [torch.from_numpy(m) for m in maps]
    return make_cams(outputs, image.shape[:2], list(range(len(class_ids))))


class CamNetwork:
    """Actor: the CAM network, loaded once; maps batches of inputs to class maps."""

    def __init__(self, *, root: str, num_classes: int, gpus: float, bf16: bool):
        self.device = pick_device(gpus)
        self.model = load_trained(root, "cam", num_classes=num_classes).to(self.device)
        self.bf16 = bf16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        scales = sum(1 for k in batch if k.startswith("input_"))
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        maps = [[_EMPTY_MAPS] * len(batch["error"]) for _ in range(scales)]
        errors = list(batch["error"])
        try:
            inputs = [[batch[f"input_{s}"][i] for s in range(scales)] for i in ok]
            for i, per_scale in zip(ok, class_maps(self.model, inputs, [batch["class_ids"][i] for i in ok],
                                                   self.device, self.bf16)):
                for s, m in enumerate(per_scale):
                    maps[s][i] = m
        except Exception as err:  # noqa: BLE001
            log.exception("CAM network failed on a batch")
            for i in ok:
                errors[i] = unreadable_reason(err, "CAM inference")
        out = {k: v for k, v in batch.items() if not k.startswith("input_")}
        return {**out, "error": np.array(errors, dtype=object),
                **{f"maps_{s}": tasks.object_array(m) for s, m in enumerate(maps)}}


def decode_with_source_cams(batch: dict[str, np.ndarray], *, source: str, num_classes: int,
                            max_pixels: int) -> dict[str, Any]:
    """CPU task (``cams.source``): decode each image and read its CAMs from ``<source>/<id>.npz``,
    fitted to the image (pipeline.data.source_cams), instead of running the CAM network."""
    images, stride4, high_res, errors = [], [], [], []
    for image_id, uri, class_ids in zip(batch["image_id"], batch["uri"], batch["class_ids"]):
        image, low, high, error = np.zeros((0, 0, 3), np.uint8), _EMPTY, _EMPTY, ""
        try:
            image, _ = read_inputs(uri, max_pixels=max_pixels)
            try:
                data = storage.read_bytes(storage.join(source, f"{image_id}.npz"))
            except FileNotFoundError:
                raise SourceCamError(f"no source CAM file {image_id}.npz in cams.source") from None
            cams, source_ids = read_source_cams(data)
            low, high = fit_source_cams(cams, source_ids, [int(c) for c in class_ids], num_classes, image.shape[:2])
        except SourceCamError as err:
            error = err.reason
        except Exception as err:  # noqa: BLE001 - one bad image must not fail the block
            error = unreadable_reason(err, "decoding")
        images.append(image)
        stride4.append(low)
        high_res.append(high)
        errors.append(error)
    return {**batch, "image": tasks.object_array(images), "stride4": tasks.object_array(stride4),
            "high_res": tasks.object_array(high_res), "error": np.array(errors, dtype=object)}


def mine_and_write(batch: dict[str, np.ndarray], *, root: str, relation_params: dict[str, float],
                   keep_high_res: bool) -> dict[str, Any]:
    """CPU task: fuse the scales into CAMs (unless a source gave them), mine relations with the
    CRF, write the relation PNG."""
    cams, high_res, heights, widths, errors = [], [], [], [], []
    for i, image_id in enumerate(batch["image_id"]):
        error, low, high = batch["error"][i], _EMPTY, _EMPTY
        image = batch["image"][i]
        if not error:
            try:
                if "stride4" in batch:
                    low, high = batch["stride4"][i], batch["high_res"][i]
                else:
                    scales = sum(1 for k in batch if k.startswith("maps_"))
                    outputs = [torch.from_numpy(batch[f"maps_{s}"][i]) for s in range(scales)]
                    low_t, high_t = make_cams(outputs, image.shape[:2], list(range(outputs[0].shape[1])))
                    low, high = low_t.numpy(), high_t.numpy()
                relations = mine_relations(image, high, batch["class_ids"][i], **relation_params)
                storage.write_bytes(layout.relation_png(root, str(image_id)), codecs.encode_semantic_png(relations))
            except Exception as err:  # noqa: BLE001
                log.exception("relation mining failed for %s", image_id)
                error = unreadable_reason(err, "relation mining")
        cams.append(low.astype(np.float16))
        high_res.append(high if keep_high_res and not error else _EMPTY)
        heights.append(image.shape[0])
        widths.append(image.shape[1])
        errors.append(error)
    return {"image_id": batch["image_id"], "uri": batch["uri"], "class_ids": batch["class_ids"],
            "cam_key": batch["cam_key"], "height": np.array(heights, np.int32), "width": np.array(widths, np.int32),
            "cams": tasks.object_array(cams), "high_res": tasks.object_array(high_res),
            "error": np.array(errors, dtype=object)}


_EMPTY = np.zeros((0, 0, 0), np.float32)
_EMPTY_MAPS = np.zeros((0, 0, 0, 0), np.float32)


def write_shard(batch: dict[str, np.ndarray], *, root: str, keep_high_res: bool) -> dict[str, np.ndarray]:
    """CPU task: commit a shard's worth of images: CAM rows, quarantine rows, high-res CAMs."""
    ok = [i for i, e in enumerate(batch["error"]) if not e]
    failed = [{"image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]), "reason": str(batch["error"][i]),
               "key": str(batch["cam_key"][i])} for i, e in enumerate(batch["error"]) if e]
    quarantine.write_quarantine(root, STAGE, failed)
    if ok:
        ok.sort(key=lambda i: str(batch["image_id"][i]))
        ids = [str(batch["image_id"][i]) for i in ok]
        name = layout.part_name([f"{i}\0{batch['cam_key'][k]}" for i, k in zip(ids, ok)])
        if keep_high_res:
            table = pa.table({"image_id": ids, **codecs.array_columns("high_res_cams", [batch["high_res"][i] for i in ok])})
            codecs.write_parquet(storage.join(layout.high_res_cams_dir(root), name), table)
        table = pa.table({
            "image_id": pa.array(ids, pa.string()),
            "key": pa.array([str(batch["cam_key"][i]) for i in ok], pa.string()),
            "uri": pa.array([str(batch["uri"][i]) for i in ok], pa.string()),
            "height": pa.array([int(batch["height"][i]) for i in ok], pa.int32()),
            "width": pa.array([int(batch["width"][i]) for i in ok], pa.int32()),
            "class_ids": pa.array([[int(c) for c in batch["class_ids"][i]] for i in ok], pa.list_(pa.int32())),
            **codecs.array_columns("cams", [batch["cams"][i] for i in ok], np.float16),
        })
        codecs.write_parquet(storage.join(layout.cams_dir(root), name), table, row_group_size=ROW_GROUP)
    return tasks.status_batch(["done" if not e else "quarantined" for e in batch["error"]])


def relation_params(cfg: Config) -> dict[str, float]:
    return {"fg_threshold": cfg.relations.fg_threshold, "bg_threshold": cfg.relations.bg_threshold,
            **{k.removeprefix("crf_"): v for k, v in vars(cfg.relations).items() if k.startswith("crf_")}}


def run_cams(cfg: Config, manifest_dir: str, classes: list[str], cams_key: str) -> dict[str, Any]:
    """CAMs and relations for every manifest image without a CAM row of its current key."""
    import ray.data

    root, section = cfg.run.root, cfg.cams
    t0 = time.perf_counter()
    pending_ref, counts_ref = tasks.run_task(plan.cams_plan, root, manifest_dir, classes, cams_key,
                                              num_returns=2, num_cpus=cfg.run.io_cpus)
    counts = {**tasks.get(counts_ref), "plan_seconds": round(time.perf_counter() - t0, 2)}
    if counts["pending"] == 0:
        return {**counts, "_skipped": True}
    block = min(max(8, section.batch_size), cfg.run.shard_rows)
    if section.source:
        ds = tasks.dataset(pending_ref, block).map_batches(
            decode_with_source_cams, batch_size=block, batch_format="numpy", num_cpus=cfg.run.io_cpus,
            fn_kwargs={"source": section.source, "num_classes": len(classes), "max_pixels": cfg.data.max_pixels})
    else:
        ds = tasks.dataset(pending_ref, block).map_batches(
            decode_for_cams, batch_size=block, batch_format="numpy", num_cpus=cfg.run.io_cpus,
            fn_kwargs={"scales": section.scales, "max_pixels": cfg.data.max_pixels},
        ).map_batches(
            CamNetwork, batch_size=section.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"root": root, "num_classes": len(classes), "gpus": section.gpus_per_actor,
                                   "bf16": section.bf16},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=section.num_actors),
            num_cpus=section.cpus_per_actor, num_gpus=section.gpus_per_actor)
    ds = ds.map_batches(
        mine_and_write, batch_size=block, batch_format="numpy", num_cpus=cfg.relations.cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=cfg.relations.max_tasks),
        fn_kwargs={"root": root, "relation_params": relation_params(cfg), "keep_high_res": section.keep_high_res},
    ).map_batches(
        write_shard, batch_size=tasks.shard_batch(cfg.run.shard_rows, block), batch_format="numpy",
        num_cpus=cfg.run.io_cpus, fn_kwargs={"root": root, "keep_high_res": section.keep_high_res})
    progress = StageProgress(STAGE, counts["pending"], every_seconds=cfg.run.progress_seconds)
    counts.update(tasks.summarise(ds, progress))
    tasks.finish_stage(layout.cams_dir(root), layout.relations_dir(root), layout.high_res_cams_dir(root),
                        layout.quarantine_dir(root))
    return counts


def read_cam_rows(uri: str, image_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of one CAM shard (only ``image_ids`` when given) with ``cams`` as float32 [K, h, w]."""
    table = codecs.read_parquet(uri, filters=None if image_ids is None else [("image_id", "in", list(image_ids))])
    columns = [c for c in ("image_id", "key", "uri", "height", "width", "class_ids") if c in table.column_names]
    rows = table.select(columns).to_pylist()
    for i, row in enumerate(rows):
        row["cams"] = codecs.read_array(table, "cams", i).astype(np.float32)
    return rows


def stage_cams(run: ledger.Run) -> dict[str, Any]:
    """CAMs and relations of the images without a CAM row of the current key (all of them when
    the key changed or ``--from-stage`` forces the stage: the old outputs are discarded first)."""
    key, root = run.cams_key(), run.root
    ledger.claim_stage_outputs(run.state, "cams", key,
                               [layout.cams_dir(root), layout.relations_dir(root), layout.high_res_cams_dir(root)],
                               forced=run.forced("cams"))
    return run_cams(run.cfg, run.manifest_dir, run.classes, key)
