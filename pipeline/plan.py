"""Planning tasks: each reads key columns of the run root and applies a rule of ``pipeline.ledger``.

They run as Ray tasks (``tasks.run_task``): the manifest and the done sets are read and joined
there, in Arrow, and only the pending rows (as an object reference) and counts reach the driver.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import label_tables, ledger, quarantine
from pipeline.data.classes import Vocabulary
from pipeline.io import codecs, layout, storage, tables

MANIFEST_COLUMNS = ["image_id", "uri", "labels", "split", "gt_semantic_uri", "gt_instance_uri",
                    "gt_instance_classes", "held_out"]


def _valid_rows(manifest_dir: str, columns: list[str]) -> pa.Table:
    uris = storage.list_files(storage.join(manifest_dir, "valid"), ".parquet")
    return tables.read_shards(uris, columns) if uris else pa.table({c: pa.array([], pa.string()) for c in columns})


def read_manifest(manifest_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of a run's manifest that every stage reads: the valid ones
    (``manifest/<stamp>/valid/``) whose image decodes (not in :func:`unreadable_file`)."""
    columns = columns or MANIFEST_COLUMNS
    uri = layout.unreadable_file(manifest_dir)
    if not storage.exists(uri):
        return _valid_rows(manifest_dir, columns)
    rows = _valid_rows(manifest_dir, list(dict.fromkeys(columns + ["image_id"])))
    bad = codecs.read_parquet_columns(uri, ["image_id"])
    return tables.join_rows(rows, bad, ["image_id"], "left anti").select(columns)


def probe_plan(root: str, manifest_dir: str, key: str) -> tuple[pa.Table, dict[str, int]]:
    """Valid manifest rows (image_id, uri) whose image is still to be decoded (ledger.plan_probe)."""
    probed = tables.read_shards(storage.list_files(layout.probe_dir(root), ".parquet"), ["image_id", "uri", "key"])
    return ledger.plan_probe(_valid_rows(manifest_dir, ["image_id", "uri"]), probed,
                             quarantine.quarantined(root, "probe"), key)


def record_unreadable(root: str, manifest_dir: str, key: str, probed: pa.Table, *, shown: int = 10) -> dict[str, Any]:
    """Write the manifest's images that do not decode (ledger.unreadable) to
    :func:`unreadable_file`; returns their count and the first ``shown`` of those among ``probed``
    (image_id, uri: the images this run decoded) as (image_id, uri, reason) rows."""
    detail = ("image_id", "uri", "stage", "reason", "key")
    rows = ledger.unreadable(_valid_rows(manifest_dir, ["image_id", "uri"]), quarantine.quarantined(root, "probe", detail),
                             key)
    codecs.write_parquet(layout.unreadable_file(manifest_dir), rows)
    new = tables.join_rows(rows, probed.select(["image_id", "uri"]), ["image_id", "uri"], "left semi")
    return {"unreadable": rows.num_rows, "new": new.num_rows,
            "shown": new.slice(0, shown).select(["image_id", "uri", "reason"]).to_pylist()}


def _images(manifest_dir: str, classes: list[str], cams_key: str, *, ground_truth_only: bool = False) -> pa.Table:
    manifest = read_manifest(manifest_dir)
    if ground_truth_only:
        has_gt = pc.or_(pc.not_equal(pc.fill_null(manifest.column("gt_semantic_uri"), ""), ""),
                        pc.not_equal(pc.fill_null(manifest.column("gt_instance_uri"), ""), ""))
        manifest = manifest.filter(has_gt)
    images = ledger.manifest_keys(manifest, classes, cams_key)
    return images.append_column("held_out", manifest.column("held_out"))


def _cam_rows(root: str) -> pa.Table:
    return tables.read_shards(storage.list_files(layout.cams_dir(root), ".parquet"), ["image_id", "key"],
                              shard_column="shard")


def current_cams(root: str, manifest_dir: str, classes: list[str], cams_key: str, *,
                 ground_truth_only: bool = False, image_ids: pa.Array | None = None) -> pa.Table:
    """The manifest's images (only those with ground truth, or among ``image_ids``, if asked) that
    have a current CAM row, with its shard (ledger.current_cams)."""
    images = _images(manifest_dir, classes, cams_key, ground_truth_only=ground_truth_only)
    if image_ids is not None:
        images = tables.join_rows(images, pa.table({"image_id": image_ids}), ["image_id"], "left semi")
    return ledger.current_cams(images, _cam_rows(root))


def cams_plan(root: str, manifest_dir: str, classes: list[str], cams_key: str) -> tuple[pa.Table, dict[str, int]]:
    """Manifest rows whose CAM outputs are still to be made (ledger.plan_cams)."""
    images = _images(manifest_dir, classes, cams_key)
    pending, counts = ledger.plan_cams(images, _cam_rows(root).select(["image_id", "key"]),
                                       quarantine.quarantined(root, "cams"))
    return pending.select(["image_id", "uri", "class_ids", "cam_key"]), counts


def cam_training_rows(manifest_dir: str, classes: list[str], *, held_out: bool = False,
                      limit: int | None = None) -> tuple[pa.Table, int, float]:
    """(uri, labels, target multi-hot) of the images the CAM network trains on (all but the
    held-out; the held-out ones with ``held_out``, at most ``limit``), their count, and the loss of
    the best constant guess (each class predicted with its frequency): the chance loss."""
    manifest = read_manifest(manifest_dir, ["uri", "labels", "held_out"])
    keep = manifest.column("held_out")
    manifest = manifest.filter(keep if held_out else pc.invert(keep)).slice(0, limit)
    targets = Vocabulary(classes).multi_hot(manifest.column("labels").to_pylist())
    table = pa.table({"uri": manifest.column("uri"), "labels": manifest.column("labels"),
                      "target": pa.array(list(targets), pa.list_(pa.float32()))})
    prior = np.clip(targets.mean(axis=0), 1e-6, 1 - 1e-6) if len(targets) else np.full(len(classes), 0.5)
    chance_loss = float(np.mean(-(prior * np.log(prior) + (1 - prior) * np.log(1 - prior))))
    return table, table.num_rows, chance_loss


def training_corrections(root: str, manifest_dir: str) -> pa.Table:
    """The newest correction of each manifest image IRNet may train on (not held out), sorted by
    image_id: (image_id, uri, correction, semantic_uri, instance_uri), the URIs absolute."""
    corrections = current_corrections(root)
    manifest = read_manifest(manifest_dir, ["image_id", "uri", "held_out"])
    manifest = manifest.filter(pc.invert(manifest.column("held_out")))
    corrections = tables.join_rows(corrections, manifest, ["image_id"], "inner", extra=["uri"])
    names = corrections.column("correction").to_pylist()
    absolute = {c: pa.array([storage.join(layout.correction_dir(root, n), v) for n, v in
                             zip(names, corrections.column(c).to_pylist())], pa.string())
                for c in ("semantic_uri", "instance_uri")}
    return pa.table({"image_id": corrections.column("image_id"), "uri": corrections.column("uri"),
                     "correction": corrections.column("correction"), **absolute})


def training_corrections_digest(corrections: pa.Table) -> str | None:
    """What IRNet's training key takes from the corrections (ledger.train_irn_key): a digest of
    the (image_id, correction) pairs of :func:`training_corrections`, None when there are none."""
    if corrections.num_rows == 0:
        return None
    return ledger.fingerprint({"corrections": [[i, c] for i, c in zip(corrections.column("image_id").to_pylist(),
                                                                      corrections.column("correction").to_pylist())]})


def irn_training_rows(root: str, manifest_dir: str, classes: list[str], cams_key: str,
                      exact: pa.Table) -> tuple[pa.Table, int]:
    """(uri, relation_uri, instance_uri) of the images IRNet trains on, sorted by image_id: those
    not held out with a current CAM row, on their mined relation map (instance_uri null), and
    those people corrected (``exact``: :func:`training_corrections`, the table IRNet's key was
    made from), on the correction's semantic and instance PNGs (a correction replaces the mined
    labels; its image needs no CAM)."""
    current = current_cams(root, manifest_dir, classes, cams_key)
    current = current.filter(pc.invert(current.column("held_out")))
    relations = pa.array([layout.relation_png(root, i) for i in current.column("image_id").to_pylist()], pa.string())
    mined = pa.table({"image_id": current.column("image_id"), "uri": current.column("uri"),
                      "relation_uri": relations, "instance_uri": pa.nulls(current.num_rows, pa.string())})
    exact = pa.table({"image_id": exact.column("image_id"), "uri": exact.column("uri"),
                      "relation_uri": exact.column("semantic_uri"), "instance_uri": exact.column("instance_uri")})
    table = pa.concat_tables([tables.join_rows(mined, exact, ["image_id"], "left anti"), exact])
    table = table.sort_by("image_id").drop_columns(["image_id"])
    return table, table.num_rows


def current_corrections(root: str) -> pa.Table:
    """The newest committed correction of each corrected image (label_tables.CORRECTION_SCHEMA, URIs
    relative to its directory) with the correction's name in ``correction``, sorted by image_id.
    A directory without ``images.parquet`` is a correction whose writer died before its commit."""
    def read(directory: str) -> list[dict[str, Any]]:
        committed = storage.join(directory, "images.parquet")
        if not storage.exists(committed):
            return []
        name = directory.rstrip("/").rsplit("/", 1)[-1]
        table = tables.conform(codecs.read_parquet(committed), label_tables.CORRECTION_SCHEMA)
        return [{**row, "correction": name} for row in table.to_pylist()]

    rows: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(16) as pool:  # names start with their stamp: later ones win
        for found in pool.map(read, storage.list_dirs(layout.corrections_root(root))):
            rows.update((row["image_id"], row) for row in found)
    schema = label_tables.CORRECTION_SCHEMA.append(pa.field("correction", pa.string()))
    return pa.Table.from_pylist([rows[k] for k in sorted(rows)], schema=schema)


def version_corrections(root: str, manifest_dir: str) -> pa.Table:
    """The corrections a labels version applies (label_tables.CORRECTION_ROWS): the newest of each image
    the manifest lists, its URIs relative to the version's directory."""
    corrections = current_corrections(root)
    manifest = read_manifest(manifest_dir, ["image_id", "uri"])
    corrections = tables.join_rows(corrections, manifest, ["image_id"], "inner", extra=["uri"])
    for column in label_tables.URI_COLUMNS:
        names, values = corrections.column("correction").to_pylist(), corrections.column(column).to_pylist()
        corrections = corrections.set_column(corrections.schema.get_field_index(column), column, pa.array(
            [layout.correction_from_version(n, v) for n, v in zip(names, values)], pa.string()))
    return corrections.select(label_tables.CORRECTION_ROWS.names).cast(label_tables.CORRECTION_ROWS)


def _synthesis_inputs(root: str, manifest_dir: str, classes: list[str], cams_key: str, labels_dir: str,
                      base_dir: str | None, stage: str, ground_truth_only: bool):
    current = current_cams(root, manifest_dir, classes, cams_key, ground_truth_only=ground_truth_only)
    base_index = label_tables.read_index(base_dir) if base_dir else label_tables.INDEX_SCHEMA.empty_table()
    return current, base_index, label_tables.labelled_rows(labels_dir), quarantine.quarantined(root, stage)


def synthesis_plan(root: str, manifest_dir: str, classes: list[str], cams_key: str, synthesis_key: str,
                   labels_dir: str, base_dir: str | None, *, stage: str = "synthesis",
                   ground_truth_only: bool = False) -> tuple[pa.Table, dict[str, int]]:
    """Images to label into ``labels_dir``, one row per CAM shard that holds them:
    (cam_shard, image_ids, uris, label_keys), and counts (ledger.plan_synthesis)."""
    current, base_index, labelled, failed = _synthesis_inputs(root, manifest_dir, classes, cams_key, labels_dir,
                                                              base_dir, stage, ground_truth_only)
    reused, pending, counts = ledger.plan_synthesis(current, synthesis_key, base_index, labelled, failed)
    base_rows = base_index.num_rows
    counts["removed"] = base_rows - reused.num_rows  # base rows no longer current (relabelled or gone)
    if not ground_truth_only:  # images whose human labels differ from the base version's
        counts["corrected"] = label_tables.corrections_changed(base_index, version_corrections(root, manifest_dir))
    grouped = pending.select(["cam_shard", "image_id", "uri", "label_key"]).group_by("cam_shard").aggregate(
        [("image_id", "list"), ("uri", "list"), ("label_key", "list")])
    grouped = grouped.rename_columns(["cam_shard", "image_ids", "uris", "label_keys"]).sort_by("cam_shard")
    return grouped, counts


def build_index(root: str, manifest_dir: str, classes: list[str], cams_key: str, synthesis_key: str,
                labels_dir: str, base: str | None, base_dir: str | None, *, stage: str = "synthesis",
                ground_truth_only: bool = False) -> dict[str, Any]:
    """Write ``labels_dir/index.parquet`` (ledger.version_index); returns the version's summary."""
    current, base_index, labelled, failed = _synthesis_inputs(root, manifest_dir, classes, cams_key, labels_dir,
                                                              base_dir, stage, ground_truth_only)
    reused, pending, _ = ledger.plan_synthesis(current, synthesis_key, base_index, labelled, failed)
    if pending.num_rows:
        raise RuntimeError(f"{labels_dir}: {pending.num_rows} images are still to be labelled; "
                           "run the synthesis stage first")
    corrections = None if ground_truth_only else version_corrections(root, manifest_dir)
    index = ledger.version_index(reused, base, labelled, current, synthesis_key, corrections)
    codecs.write_parquet(layout.index_file(labels_dir), index)
    detail = ("image_id", "uri", "key", "stage", "reason")
    rejects = (rejected_rows(root, manifest_dir) if not ground_truth_only
               else quarantine.QUARANTINE_SCHEMA.empty_table())
    images = _images(manifest_dir, classes, cams_key, ground_truth_only=ground_truth_only)
    missing = ledger.version_quarantine(rejects, images, quarantine.quarantined(root, "cams", detail), current,
                                        synthesis_key, quarantine.quarantined(root, stage, detail))
    if index.num_rows:  # a corrected image whose CAMs or labels failed is in the version
        human = index.filter(pc.equal(index.column("source"), "human")).select(["image_id"])
        failed = pc.is_in(missing.column("stage"), pa.array(["cams", stage]))
        missing = pa.concat_tables([missing.filter(pc.invert(failed)),
                                    tables.join_rows(missing.filter(failed), human, ["image_id"], "left anti")]
                                   ).sort_by([("image_id", "ascending"), ("stage", "ascending")])
    codecs.write_parquet(storage.join(labels_dir, "quarantine.parquet"), missing)
    return {**index_summary(index, classes), "quarantined": missing.num_rows}


def manifest_rejects(root: str) -> pa.Table:
    """The rows the manifest stage of the latest run rejected (quarantine/manifest.parquet)."""
    uri = storage.join(layout.quarantine_dir(root), "manifest.parquet")
    return codecs.read_parquet(uri) if storage.exists(uri) else quarantine.QUARANTINE_SCHEMA.empty_table()


def rejected_rows(root: str, manifest_dir: str) -> pa.Table:
    """The manifest's rows no stage reads: those the manifest stage rejected and the images the
    probe could not decode (QUARANTINE_SCHEMA)."""
    parts = [manifest_rejects(root)]
    if storage.exists(layout.unreadable_file(manifest_dir)):
        parts.append(codecs.read_parquet(layout.unreadable_file(manifest_dir)))
    return pa.concat_tables([t.select(quarantine.QUARANTINE_SCHEMA.names).cast(quarantine.QUARANTINE_SCHEMA) for t in parts])


def index_summary(index: pa.Table, classes: list[str]) -> dict[str, Any]:
    """Counts and label-health figures of a version's index (small; kept in run.json)."""
    images = index.num_rows
    instances = int(pc.sum(index.column("num_instances")).as_py() or 0)
    flat = pc.list_flatten(index.column("class_ids"))
    per_class = {classes[int(v["values"]) - 1]: int(v["counts"]) for v in pc.value_counts(flat).to_pylist()
                 if 1 <= int(v["values"]) <= len(classes)} if len(flat) else {}
    fg = index.column("fg_fraction").to_numpy(zero_copy_only=False) if images else np.zeros(0)
    cam = index.column("cam_fraction").to_numpy(zero_copy_only=False) if images else np.zeros(0)
    tagged = pc.list_value_length(index.column("class_ids")).to_numpy(zero_copy_only=False) > 0 if images else fg > 0
    tags = int(len(flat))
    health = {
        "tagged_images_all_background": float(np.mean(fg[tagged] == 0)) if tagged.any() else None,
        "foreground_fraction": float(np.mean(fg)) if images else None,
        "cam_fraction": float(np.mean(cam)) if images else None,
        "foreground_to_cam_area": float(np.sum(fg) / np.sum(cam)) if images and np.sum(cam) > 0 else None,
        "instances_per_image": instances / images if images else None,
        "instances_per_tag": instances / tags if tags else None,
    }
    corrected = int(pc.sum(pc.equal(index.column("source"), "human")).as_py() or 0) if images else 0
    return {"images": images, "instances": instances, "corrected": corrected, "images_per_class": per_class,
            "health": health, "health_warnings": health_warnings(health)}


# The healthy (low, high) range of the label-health figures that have one (ends included; None:
# unbounded): outside it, health_warnings warns and the report marks the figure.
HEALTHY = {"tagged_images_all_background": (None, 0.2), "foreground_to_cam_area": (0.5, 2.0),
           "instances_per_tag": (0.5, 8.0)}


def in_range(value: float | None, bounds: tuple[float | None, float | None] | None) -> bool | None:
    """Whether ``value`` lies in ``bounds`` (ends included); None without a value or a range."""
    if bounds is None or value is None or not np.isfinite(float(value)):
        return None
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def healthy(key: str, value: float | None) -> bool | None:
    """Whether label-health figure ``key`` lies in its HEALTHY range; None without a value or a range."""
    return in_range(value, HEALTHY.get(key))


def health_warnings(health: dict[str, float | None]) -> list[str]:
    """What looks wrong in labels without ground truth to check them against."""
    warnings = []
    empty, ratio, per_tag = (health.get(k) for k in ("tagged_images_all_background", "foreground_to_cam_area",
                                                     "instances_per_tag"))
    if healthy("tagged_images_all_background", empty) is False:
        warnings.append(f"{100 * empty:.0f}% of tagged images are labelled all background: the background "
                        "thresholds (synthesis.*_bg_threshold) may be too high, or the CAMs too weak")
    if healthy("foreground_to_cam_area", ratio) is False:
        side = "less" if ratio < HEALTHY["foreground_to_cam_area"][0] else "more"
        warnings.append(f"the labels cover {ratio:.2f}x the area the CAMs activate, much {side}: check the "
                        "background thresholds (python -m jobs.tune when some images have ground truth)")
    if healthy("instances_per_tag", per_tag) is False:
        warnings.append(f"{per_tag:.2f} instances per image tag: instances are probably "
                        f"{'lost' if per_tag < HEALTHY['instances_per_tag'][0] else 'fragmented'}")
    return warnings
