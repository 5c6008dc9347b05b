"""The probe stage's pieces without Ray: images that do not decode are quarantined once, with a
reason, and no stage reads them; a rerun decodes only what is new (pipeline.stages.probe, plan)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import plan, quarantine
from pipeline.io import codecs, layout, storage
from pipeline.stages import probe


def _png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run_root(tmp_path) -> tuple[str, str]:
    """A run root whose manifest lists a good image, a truncated one, a text file and a missing one."""
    root, data = str(tmp_path / "run"), tmp_path / "data"
    files = {"good": _png(), "truncated": _png(64)[:60], "text": b"id,label\n1,cat\n"}
    for name, content in files.items():
        storage.write_bytes(str(data / f"{name}.png"), content)
    ids = [*files, "missing"]
    manifest_dir = layout.manifest_dir(root, "S")
    codecs.write_parquet(storage.join(manifest_dir, "valid", "part-000000.parquet"), pa.table({
        "image_id": ids, "uri": [str(data / f"{i}.png") for i in ids],
        "labels": pa.array([["disc"]] * len(ids), pa.list_(pa.string())), "held_out": [False] * len(ids)}))
    return root, manifest_dir


def test_undecodable_images_are_quarantined_once_and_no_stage_reads_them(tmp_path):
    root, manifest_dir = _run_root(tmp_path)
    pending, counts = plan.probe_plan(root, manifest_dir, "K")
    assert counts == {"images": 4, "skipped": 0, "pending": 4}
    statuses = probe.probe_batch(pending, root=root, key="K", max_pixels=10_000)["status"].tolist()
    assert statuses == ["decoded", "quarantined", "quarantined", "quarantined"]
    found = plan.record_unreadable(root, manifest_dir, "K", pending, shown=2)
    assert found["unreadable"] == found["new"] == 3 and len(found["shown"]) == 2
    reasons = {r["image_id"]: r["reason"] for r in quarantine.quarantined(root, "probe", ("image_id", "reason")).to_pylist()}
    assert reasons == {"truncated": "truncated or corrupt image data (image file is truncated)",
                       "text": "not a recognised image format", "missing": "image file not found"}
    # Every stage reads the manifest through read_manifest: CAM training rows hold the good image only.
    assert plan.read_manifest(manifest_dir).column("image_id").to_pylist() == ["good"]
    assert plan.read_manifest(manifest_dir, ["uri"]).column_names == ["uri"]
    assert plan.cam_training_rows(manifest_dir, ["disc"])[1] == 1
    # A labels version lists them with the manifest's own rejects.
    assert sorted(plan.rejected_rows(root, manifest_dir).column("image_id").to_pylist()) == ["missing", "text", "truncated"]
    # The next night decodes nothing again; a new pixel limit (another key) decodes everything.
    assert plan.probe_plan(root, manifest_dir, "K")[1] == {"images": 4, "skipped": 4, "pending": 0}
    assert plan.probe_plan(root, manifest_dir, "K2")[1]["pending"] == 4
    assert plan.record_unreadable(root, manifest_dir, "K", pending.slice(0, 0))["new"] == 0


def test_an_image_that_cannot_be_read_for_now_is_probed_again(tmp_path, monkeypatch):
    root, manifest_dir = _run_root(tmp_path)
    pending, _ = plan.probe_plan(root, manifest_dir, "K")
    read = storage.read_bytes

    def flaky(uri):
        if uri.endswith("good.png"):
            raise ConnectionError("connection reset")
        return read(uri)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    statuses = probe.probe_batch(pending, root=root, key="K", max_pixels=10_000)["status"].tolist()
    assert statuses[0] == "unread"
    monkeypatch.setattr(storage, "read_bytes", read)
    assert plan.probe_plan(root, manifest_dir, "K")[0].column("image_id").to_pylist() == ["good"]
