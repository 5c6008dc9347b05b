"""What a nightly rerun costs as the labelled set grows: files written, objects read, seconds per
phase and the driver's peak memory, for run roots of N labelled images plus 1% new ones.

    .venv/bin/python benchmarks/nightly_scale.py [--sizes 1000 10000 100000] [--new 0.01]
                                                 [--work DIR] [--keep]

For each N:

1. **Build** a labelled run root of N tiny images (32x32 PNGs, 1-2 of 4 classes) the way a finished
   run leaves it: the validated manifest is not needed, everything else is written with the
   pipeline's own writers and keys (``pipeline.ledger``): random-init ResNet-18 CAM and IRNet models,
   run.json stage records, CAM shards of ``run.shard_rows`` images (stride-4 CAMs of the image's
   tags), one relation PNG per image, labels version v0 (semantic and instance PNG per image,
   instance shards with their COCO parts, ``images/`` shards, ``index.parquet``, ``coco.json``)
   and ``labels/LATEST``. The labels are not network outputs (building them through the networks
   would take hours here); the rerun's bookkeeping cost does not depend on what they show.
   The CAM network's held-out measurement (``stages.train_cam.held_out``: its classification mAP
   on the held-out images, recorded once per model file) is made here too, as the run that trained
   the model makes it, and timed as its own phase: without that record the rerun would score up to
   ``eval.max_classification_images`` held-out images once (~220 s at 10^4 images on a 2-core
   CPU with the default 512 crop they are fitted into; 64 here, as for IRNet, since the images
   are 32x32), which a real night never does.
2. **Rerun**: append ``--new`` x N new images to the manifest and run ``jobs.label`` on it in a
   fresh process (embedded local Ray, 2 CPUs) with ``IRN_IO_LOG`` set, so every storage read,
   write and listing of the driver and of every Ray worker is logged (pipeline.io.storage).

Reported per N: new images; the held-out scoring's seconds (at build time, once per CAM model);
files written under the run root (all, and outside report/, run.json, manifest/ and models/);
objects read; directory listings; seconds of the whole rerun and of its phases (manifest
validation, train_cam (the models are reused: ~0 s), CAM planning, CAMs, synthesis planning,
synthesis, publish, and any other stage the run records); and the driver's peak RSS
(``ru_maxrss`` of the job process; Ray's workers are other processes). It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

CLASSES = ["cross", "diamond", "disc", "square"]
SIZE = 32
IGNORED = ("report/", "manifest/", "models/", "run.json")


def image_bytes(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_images(data: str, start: int, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    records = []
    for i in range(start, start + count):
        image_id = f"img-{i:08d}"
        with open(os.path.join(data, "images", f"{image_id}.png"), "wb") as f:
            f.write(image_bytes(rng))
        tags = sorted(rng.choice(CLASSES, size=int(rng.integers(1, 3)), replace=False).tolist())
        records.append({"image_id": image_id, "uri": f"images/{image_id}.png", "labels": tags})
    return records


def write_manifest(path: str, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def config_args(manifest: str, root: str) -> list[str]:
    sets = [f"data.manifest={manifest}", f"run.root={root}", f"data.classes=[{', '.join(CLASSES)}]",
            "ray.num_cpus=2", "train_cam.depth=18", "train_cam.crop_size=64", "train_cam.backbone_init=none",
            "train_irn.depth=18", "train_irn.backbone_init=cam", "train_irn.crop_size=64", "cams.scales=[1.0]",
            "cams.cpus_per_actor=0.5", "relations.cpus_per_task=0.5", "synthesis.cpus_per_actor=0.5",
            "synthesis.cpus_per_task=0.5", "synthesis.steps=32", "eval.num_previews=2", "run.retrain=never",
            "run.progress_seconds=30", "run.min_cam_map=0"]
    return sum((["--set", s] for s in sets), [])


def record_held_out(root: str, cfg, records: list[dict], data: str) -> float:
    """Score the CAM model on the held-out images and record it in run.json as the run that
    trained it does (``stages.train_cam.held_out``, keyed by the model file); returns seconds."""
    import pyarrow as pa

    from pipeline import ledger
    from pipeline.io import layout
    from pipeline.stages.manifest import held_out
    from pipeline.train.cam import classifier_quality

    t0 = time.perf_counter()
    keep = held_out(pa.table({"image_id": [r["image_id"] for r in records]}), by_split=False,
                    fraction=cfg.data.held_out_fraction).to_pylist()
    rows = [{"uri": os.path.join(data, r["uri"]), "labels": r["labels"]} for r, k in zip(records, keep) if k]
    quality = classifier_quality(root, rows[:cfg.eval.max_classification_images], CLASSES,
                                 size=cfg.train_cam.crop_size, max_pixels=cfg.data.max_pixels)
    model = ledger.file_fingerprint(layout.model_file(root, "cam"))
    ledger.RunState(root).update_stage("train_cam", held_out={**(quality or {"images": 0}), "model": model})
    return time.perf_counter() - t0


def build_root(root: str, records: list[dict], data: str, args: list[str]) -> tuple[float, float]:
    """A run root as a finished run over ``records`` leaves it; returns (seconds taken in all, of
    which the held-out scoring)."""
    import pyarrow as pa
    import torch

    from jobs import _cli
    from pipeline import label_tables, ledger
    from pipeline.io import codecs, layout, storage
    from pipeline.models.cam_net import build_cam_net
    from pipeline.models.irnet import build_irnet
    from pipeline.stages.coco import coco_part, write_coco
    from pipeline.stages.synthesis import instance_rows

    t0 = time.perf_counter()
    cfg = _cli.load(_cli.parser("").parse_args(args))
    torch.manual_seed(0)
    for network, net, section in (("cam", build_cam_net(num_classes=len(CLASSES), depth=18), cfg.train_cam),
                                  ("irn", build_irnet(depth=18), cfg.train_irn)):
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        storage.write_bytes(layout.model_file(root, network), buf.getvalue())
        storage.write_text(layout.model_file(root, network) + ".json", json.dumps({"config": vars(section)}))
    state = ledger.RunState(root)
    cam_model = ledger.file_fingerprint(layout.model_file(root, "cam"))
    cams_key = ledger.cams_key(cfg, CLASSES, cam_model)
    irn_model = ledger.file_fingerprint(layout.model_file(root, "irn"))
    state.update_stage("train_cam", key=ledger.train_cam_key(cfg, CLASSES), trained=True, status="done")
    state.update_stage("cams", key=cams_key, status="done")
    state.update_stage("train_irn", key=ledger.train_irn_key(cfg, cams_key), trained=True, status="done")
    synthesis_key = ledger.synthesis_key(cfg, CLASSES, cams_key, [cam_model, irn_model])
    probe_key = ledger.probe_key(cfg)
    index = {name: i + 1 for i, name in enumerate(CLASSES)}
    grid = -(-SIZE // 4)
    labels_dir = layout.labels_dir(root, "v0")
    shard = cfg.run.shard_rows
    semantic = np.zeros((SIZE, SIZE), np.uint8)
    mask = np.zeros((1, SIZE, SIZE), bool)
    mask[0, 8:20, 8:20] = True
    for start in range(0, len(records), shard):
        chunk = records[start:start + shard]
        class_ids = [sorted(index[t] for t in r["labels"]) for r in chunk]
        keys = ledger.row_keys(cams_key, class_ids).to_pylist()
        ids = [r["image_id"] for r in chunk]
        cams = [np.full((len(c), grid, grid), 0.5, np.float16) for c in class_ids]
        table = pa.table({"image_id": ids, "key": keys, "uri": [os.path.join(data, r["uri"]) for r in chunk],
                          "height": pa.array([SIZE] * len(chunk), pa.int32()),
                          "width": pa.array([SIZE] * len(chunk), pa.int32()),
                          "class_ids": pa.array(class_ids, pa.list_(pa.int32())),
                          **codecs.array_columns("cams", cams, np.float16)})
        codecs.write_parquet(storage.join(layout.cams_dir(root), layout.part_name([f"{i}\0{k}" for i, k in zip(ids, keys)])),
                             table, row_group_size=64)
        probed = pa.table({"image_id": ids, "uri": table.column("uri"),  # the probe stage's record: decoded
                           "key": [probe_key] * len(ids)}, schema=ledger.PROBE_SCHEMA)
        codecs.write_parquet(storage.join(layout.probe_dir(root), layout.part_name([f"{i}\0{probe_key}" for i in ids])),
                             probed)
        label_keys = ledger.label_keys(synthesis_key, pa.array(keys)).to_pylist()
        images, instances = [], []
        for record, tags, key in zip(chunk, class_ids, label_keys):
            image_id = record["image_id"]
            semantic[8:20, 8:20] = tags[0]
            png = codecs.encode_semantic_png(semantic)
            storage.write_bytes(layout.relation_png(root, image_id), png)
            storage.write_bytes(layout.semantic_png(labels_dir, image_id), png)
            storage.write_bytes(layout.instance_png(labels_dir, image_id), codecs.encode_instance_png(mask[0] * 1))
            instances += instance_rows(image_id, mask, np.array([tags[0]]), np.array([0.9]))
            images.append({"image_id": image_id, "key": key, "uri": os.path.join(data, record["uri"]),
                           "height": SIZE, "width": SIZE, "class_ids": tags, "num_instances": 1,
                           "semantic_uri": f"semantic/{image_id}.png", "instance_uri": f"instance/{image_id}.png",
                           "instances_uri": None, "fg_fraction": 144 / SIZE**2, "cam_fraction": 1.0})
        label_tables.commit_labels(labels_dir, images, instances, coco_part(instances))
    index_table = label_tables.labelled_rows(labels_dir).sort_by("image_id")
    codecs.write_parquet(layout.index_file(labels_dir), index_table)
    write_coco(labels_dir, CLASSES)
    state.labels["pending"] = {"name": "v0", "key": synthesis_key, "base": None}
    ledger.publish_version(state, root, "v0", {"images": len(records)})
    held_out_seconds = record_held_out(root, cfg, records, data)
    return time.perf_counter() - t0, held_out_seconds


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
    return out


RERUN = """
import json, resource, sys, time
from jobs import label
t0 = time.perf_counter()
state = label.main(sys.argv[1:])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "stages": state["stages"],
                              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def rerun(args: list[str], io_log: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "IRN_IO_LOG": io_log, "RAY_AUTH_MODE": "disabled",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", RERUN, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def io_counts(io_log: str, root: str) -> dict[str, int]:
    counts = {"read": 0, "list": 0, "write": 0}
    with open(io_log) as f:
        for line in f:
            op, _, uri = line.rstrip("\n").partition(" ")
            if op in counts and uri.startswith(root):
                counts[op] += 1
    return counts


def measure(n: int, new_fraction: float, work: str) -> dict:
    data, root = os.path.join(work, "data"), os.path.join(work, "run")
    records = write_images(data, 0, n, seed=n)
    base_manifest = os.path.join(data, "base.parquet")
    write_manifest(base_manifest, records)
    build_seconds, held_out_seconds = build_root(root, records, data, config_args(base_manifest, root))
    new = max(1, int(round(n * new_fraction)))
    grown = os.path.join(data, "nightly.parquet")
    write_manifest(grown, records + write_images(data, n, new, seed=n + 1))
    before = snapshot(root)
    io_log = os.path.join(work, "io.log")
    result = rerun(config_args(grown, root), io_log)
    after = snapshot(root)
    written = [p for p, st in after.items() if before.get(p) != st]
    stages = result["stages"]
    counts = lambda name: stages.get(name, {}).get("counts", {})  # noqa: E731
    return {
        "images": n, "new": new, "build_s": build_seconds, "held_out_build_s": held_out_seconds,
        "files_written": len(written),
        "files_written_outside": sum(not p.startswith(IGNORED) for p in written), **io_counts(io_log, root),
        "rerun_s": result["seconds"], "manifest_s": stages["manifest"]["seconds"],
        "train_cam_s": stages.get("train_cam", {}).get("seconds"),
        "cams_plan_s": counts("cams").get("plan_seconds"), "cams_s": stages["cams"]["seconds"],
        "synthesis_plan_s": counts("synthesis").get("plan_seconds"), "synthesis_s": stages["synthesis"]["seconds"],
        "publish_s": stages["publish"]["seconds"], "driver_peak_rss_mib": result["peak_rss_mib"],
        "stage_s": {name: stage.get("seconds") for name, stage in stages.items()},  # every stage, new ones too
    }


def table(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table; a stage the fixed columns do not name gets a column of its own."""
    columns = ["images", "new", "held_out_build_s", "files_written", "files_written_outside", "read", "list",
               "rerun_s", "manifest_s", "train_cam_s", "cams_plan_s", "cams_s", "synthesis_plan_s", "synthesis_s",
               "publish_s", "driver_peak_rss_mib"]
    for row in rows:
        for name in row["stage_s"]:
            if f"{name}_s" not in columns:
                columns.insert(columns.index("driver_peak_rss_mib"), f"{name}_s")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(c, row["stage_s"].get(c.removesuffix("_s"))) for c in columns]
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--new", type=float, default=0.01, help="new images as a fraction of N")
    p.add_argument("--work", help="working directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the run roots")
    args = p.parse_args()
    rows = []
    for n in args.sizes:
        work = os.path.join(args.work or tempfile.mkdtemp(prefix="nightly-"), f"n{n}")
        shutil.rmtree(work, ignore_errors=True)
        rows.append(measure(n, args.new, work))
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
