"""Stage: CAM inference (GPU/CPU actor pool) streaming into CRF relation mining (CPU tasks).

Writes stride-4 CAMs (float16) to ``cams/part-*.parquet`` and relation labels to
``relations/<id>.png``; full-resolution CAMs only travel between the two operators (persisted to
``cams_high_res/`` only when ``cams.keep_high_res`` is set). Images that fail become quarantine
rows of stage ``cams``; an image is done when its CAM row exists or it is quarantined.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.algorithms.cams import make_cams
from pipeline.algorithms.relations import mine_relations
from pipeline.config import Config
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.transforms import normalize, resize_image, scaled_size
from pipeline.io import codecs, layout, storage
from pipeline.stages import common
from pipeline.train.common import load_trained

log = logging.getLogger(__name__)
STAGE = "cams"


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def multiscale_cams(model: torch.nn.Module, image: np.ndarray, class_ids: list[int], scales: list[float],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: CAMs of ``image`` (uint8 [H, W, 3]) at ``scales`` with flips -> (stride-4, full-res)."""
    height, width = image.shape[:2]
    outputs = []
    for scale in scales:
        scaled = normalize(resize_image(image, scaled_size(height, width, scale)))
        x = torch.from_numpy(scaled).to(device)[None]
        x = torch.cat([x, x.flip(-1)])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs.append(model.cam_maps(x).float())
    return make_cams(outputs, (height, width), [c - 1 for c in class_ids])


class CamInference:
    """Actor: loads the CAM network once; maps manifest rows to CAMs (or a decode error)."""

    def __init__(self, *, root: str, num_classes: int, scales: list[float], max_pixels: int, gpus: float):
        self.device = pick_device(gpus)
        self.model = load_trained(root, "cam", num_classes=num_classes).to(self.device)
        self.scales, self.max_pixels = scales, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list] = {k: [] for k in ("image_id", "uri", "class_ids", "image", "cams", "high_res", "error")}
        for image_id, uri, class_ids in zip(batch["image_id"], batch["uri"], batch["class_ids"]):
            class_ids = np.asarray(class_ids, np.int32)
            # Failed rows carry empty arrays (same ndim) so the batch stays a tensor column.
            image, cams, high_res, error = np.zeros((0, 0, 3), np.uint8), _EMPTY, _EMPTY, ""
            try:
                image = decode_image(storage.read_bytes(str(uri)), max_pixels=self.max_pixels)
                cams, high_res = multiscale_cams(self.model, image, class_ids.tolist(), self.scales, self.device)
                cams, high_res = cams.cpu().numpy(), high_res.cpu().numpy()
            except ImageDecodeError as err:
                error = err.reason
            except FileNotFoundError:
                error = "image file not found"
            except Exception as err:  # noqa: BLE001 - one bad image must not fail the block
                log.exception("CAM inference failed for %s", image_id)
                error = f"CAM inference failed ({type(err).__name__}: {err})"
            for key, value in (("image_id", str(image_id)), ("uri", str(uri)), ("class_ids", class_ids),
                               ("image", image), ("cams", cams), ("high_res", high_res), ("error", error)):
                out[key].append(value)
        return {k: _object_array(v) for k, v in out.items()}


_EMPTY = np.zeros((0, 0, 0), np.float32)


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def mine_and_write(batch: dict[str, np.ndarray], *, root: str, relation_params: dict[str, float],
                   keep_high_res: bool) -> dict[str, np.ndarray]:
    """Task: CRF relation mining per image, then one CAM shard + quarantine shard per batch."""
    rows, quarantine, statuses, high_res_rows = [], [], [], []
    for i, image_id in enumerate(batch["image_id"]):
        error = batch["error"][i]
        if not error:
            try:
                relations = mine_relations(batch["image"][i], batch["high_res"][i], batch["class_ids"][i],
                                           **relation_params)
                storage.write_bytes(layout.relation_png(root, image_id),
                                    codecs.encode_semantic_png(relations))
            except Exception as err:  # noqa: BLE001
                log.exception("relation mining failed for %s", image_id)
                error = f"relation mining failed ({type(err).__name__}: {err})"
        if error:
            quarantine.append({"image_id": image_id, "uri": batch["uri"][i], "reason": error})
            statuses.append("quarantined")
            continue
        height, width = batch["image"][i].shape[:2]
        rows.append({"image_id": image_id, "uri": batch["uri"][i], "height": height, "width": width,
                     "class_ids": [int(c) for c in batch["class_ids"][i]], "cams": batch["cams"][i]})
        if keep_high_res:
            high_res_rows.append((image_id, batch["high_res"][i]))
        statuses.append("done")
    common.write_quarantine(root, STAGE, quarantine)
    if high_res_rows:
        ids = [r[0] for r in high_res_rows]
        table = pa.table({"image_id": ids, **codecs.array_columns("high_res_cams", [r[1] for r in high_res_rows])})
        codecs.write_parquet(storage.join(layout.high_res_cams_dir(root), layout.part_name(ids)), table)
    if rows:
        write_cam_shard(root, rows)
    return common.status_batch(statuses)


CAM_COLUMNS = ("image_id", "uri", "height", "width", "class_ids")


def write_cam_shard(root: str, rows: list[dict[str, Any]]) -> None:
    """One atomic Parquet shard of stride-4 CAMs (float16) and their image metadata."""
    ids = [r["image_id"] for r in rows]
    table = pa.table({
        "image_id": pa.array(ids, pa.string()), "uri": pa.array([r["uri"] for r in rows], pa.string()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "class_ids": pa.array([r["class_ids"] for r in rows], pa.list_(pa.int32())),
        **codecs.array_columns("cams", [r["cams"] for r in rows], np.float16),
    })
    codecs.write_parquet(storage.join(layout.cams_dir(root), layout.part_name(ids)), table)


def stage_key(cfg: Config, classes: list[str]) -> str:
    """What the CAM outputs depend on: the CAM model, the classes and the settings used."""
    return common.fingerprint({"model": common.file_fingerprint(layout.model_file(cfg.run.root, "cam")),
                               "classes": classes, "cams": common.settings(cfg.cams, inference=True),
                               "relations": common.settings(cfg.relations), "max_pixels": cfg.data.max_pixels})


def pending(root: str, source: pa.Table) -> pa.Table:
    """Rows of ``source`` (image_id, uri, class_ids) whose CAM outputs are missing or out of date.

    A CAM row is out of date when the manifest now gives the image other tags (a nightly manifest
    may fix them); a quarantine row when the manifest now gives another uri (a fixed reference is
    retried). Out-of-date rows are removed here, so each image keeps one CAM row. A file changed
    in place under the same id, uri and tags is not detected: give it a new id.
    """
    ids, uris, class_ids = (source.column(c).to_pylist() for c in ("image_id", "uri", "class_ids"))
    wanted = {i: (u, tuple(c)) for i, u, c in zip(ids, uris, class_ids)}
    made = common.read_class_ids(layout.cams_dir(root))
    failed = common.quarantined_uris(root, STAGE)
    stale = {i for i, tags in made.items() if i in wanted and tags != wanted[i][1]}
    stale_failed = {i for i, uri in failed.items() if i in wanted and uri != wanted[i][0]}
    if stale or stale_failed:
        log.warning("%d images have new tags or a new uri since they were processed; redoing them",
                    len(stale | stale_failed))
        # Later stages' failures of a retagged image were failures on its old CAMs: retry them too.
        for later in ("synthesis-", "ablation_"):
            common.drop_rows(layout.quarantine_dir(root), stale, prefix=later)
        common.drop_rows(layout.cams_dir(root), stale)
        common.drop_rows(layout.quarantine_dir(root), stale_failed, prefix=f"{STAGE}-")
    done = (set(made) - stale) | (set(failed) - stale_failed)
    todo = [i not in done for i in ids]
    # High-res rows of an image without its CAM row (a writer died between the two shards) would
    # be written again in another shard: drop them first.
    common.drop_rows(layout.high_res_cams_dir(root), {i for i, t in zip(ids, todo) if t})
    return source.filter(pa.array(todo, pa.bool_()))


def run_cams(cfg: Config, table: pa.Table, classes: list[str]) -> dict[str, int]:
    """Run the stage over the manifest rows in ``table`` (image_id, uri, labels); counts by status."""
    import ray.data

    common.prepare_stage_dir(layout.cams_dir(cfg.run.root), stage_key(cfg, classes))
    index = {name: i + 1 for i, name in enumerate(classes)}
    class_ids = [sorted(index[n] for n in labels) for labels in table.column("labels").to_pylist()]
    source = pending(cfg.run.root, pa.table({"image_id": table.column("image_id"), "uri": table.column("uri"),
                                             "class_ids": pa.array(class_ids, pa.list_(pa.int32()))}))
    if source.num_rows == 0:
        return {"skipped": table.num_rows}
    cam_cfg = cfg.cams
    relation_params = {"fg_threshold": cfg.relations.fg_threshold, "bg_threshold": cfg.relations.bg_threshold,
                       **{k.removeprefix("crf_"): v for k, v in vars(cfg.relations).items() if k.startswith("crf_")}}
    ds = common.blocks(source, rows_per_block=max(4, cam_cfg.batch_size)).map_batches(
        CamInference, batch_size=cam_cfg.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"root": cfg.run.root, "num_classes": len(classes), "scales": cam_cfg.scales,
                               "max_pixels": cfg.data.max_pixels, "gpus": cam_cfg.gpus_per_actor},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cam_cfg.num_actors),
        num_cpus=cam_cfg.cpus_per_actor, num_gpus=cam_cfg.gpus_per_actor,
    ).map_batches(
        mine_and_write, batch_size=max(4, cam_cfg.batch_size), batch_format="numpy",
        fn_kwargs={"root": cfg.run.root, "relation_params": relation_params,
                               "keep_high_res": cam_cfg.keep_high_res},
        compute=ray.data.TaskPoolStrategy(size=cfg.relations.max_tasks), num_cpus=cfg.relations.cpus_per_task)
    counts = common.summarise(ds)
    root = cfg.run.root
    common.finish_stage(layout.cams_dir(root), layout.relations_dir(root), layout.high_res_cams_dir(root),
                        layout.quarantine_dir(root))
    counts["skipped"] = table.num_rows - source.num_rows
    return counts



def read_cam_rows(uri: str) -> list[dict[str, Any]]:
    """Rows of one CAM shard with ``cams`` as float32 [K, h, w] arrays."""
    table = codecs.read_parquet(uri)
    rows = table.select(list(CAM_COLUMNS)).to_pylist()
    for i, row in enumerate(rows):
        row["cams"] = codecs.read_array(table, "cams", i).astype(np.float32)
    return rows
