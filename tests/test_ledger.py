"""The bookkeeping rules of pipeline.ledger on hand-made tables: what is done, pending, reused,
and how versions begin, resume, publish and are retained."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline import label_tables, ledger, quarantine
from pipeline.io import codecs, layout, storage, tables


def _images(rows):
    """(image_id, uri, class_ids) -> manifest_keys-like table with cam keys of stage 'S'."""
    class_ids = [c for _, _, c in rows]
    return pa.table({"image_id": [i for i, _, _ in rows], "uri": [u for _, u, _ in rows],
                     "class_ids": pa.array(class_ids, pa.list_(pa.int32())),
                     "cam_key": ledger.row_keys("S", class_ids), "split": [""] * len(rows)})


def test_row_keys_follow_stage_and_tags():
    a, b, c = ledger.row_keys("S", [[1, 2], [1], [1, 2]]).to_pylist()
    assert a == c and a != b
    assert ledger.row_keys("T", [[1, 2]]).to_pylist() != [a]
    assert ledger.label_keys("X", pa.array([a])).to_pylist() != ledger.label_keys("Y", pa.array([a])).to_pylist()


def test_synthesis_key_follows_the_grouping_settings_that_are_used():
    from pipeline.config import from_dict

    def key(*overrides):
        return ledger.synthesis_key(from_dict({}, list(overrides)), ["a"], "cams", ["m"])

    official = key("synthesis.grouping=official")
    assert key("synthesis.grouping=official", "synthesis.density_sigma=3") == official  # unused by official
    assert key("synthesis.grouping=official", "synthesis.centroid_iterations=7") != official
    density = key("synthesis.grouping=density")
    assert density != official and key("synthesis.grouping=density", "synthesis.density_sigma=3") != density


def test_join_rows_keeps_left_order_and_list_columns():
    left = pa.table({"k": ["a", "b", "c", "d"], "v": pa.array([[1], [2], [3, 4], []], pa.list_(pa.int32()))})
    right = pa.table({"k": ["c", "a", "a", "zz"], "shard": ["s3", "s1", "s2", "s9"]})
    assert tables.join_rows(left, right, ["k"], "left semi").column("k").to_pylist() == ["a", "c"]
    anti = tables.join_rows(left, right, ["k"], "left anti")
    assert anti.column("k").to_pylist() == ["b", "d"] and anti.column("v").to_pylist() == [[2], []]
    inner = tables.join_rows(left, right, ["k"], "inner", extra=["shard"])
    assert inner.column("k").to_pylist() == ["a", "c"]  # one row per left row even with duplicates right
    assert inner.column("shard").to_pylist() == ["s2", "s3"] and inner.column("v").to_pylist() == [[1], [3, 4]]


def test_plan_cams_redoes_new_retagged_and_moved_failures_only():
    images = _images([("a", "a.png", [1]), ("b", "new/b.png", [1]), ("c", "c.png", [1]), ("e", "e.png", [2, 3]),
                      ("f", "f.png", [1])])
    keys = dict(zip(images.column("image_id").to_pylist(), images.column("cam_key").to_pylist()))
    cam_rows = pa.table({"image_id": ["a", "e"], "key": [keys["a"], ledger.row_keys("S", [[2]])[0].as_py()]})
    failed = pa.table({"image_id": ["b", "f"], "uri": ["old/b.png", "f.png"], "key": [keys["b"], keys["f"]]})
    pending, counts = ledger.plan_cams(images, cam_rows, failed)
    # a: done; b: moved since it failed, retried; c: new; e: retagged, redone; f: still broken.
    assert pending.column("image_id").to_pylist() == ["b", "c", "e"]
    assert counts == {"images": 5, "skipped": 2, "pending": 3}


def test_plan_probe_decodes_new_and_moved_images_once():
    images = pa.table({"image_id": ["a", "b", "c", "d", "e"], "uri": ["a.png", "new/b.png", "c.png", "d.png", "e.png"]})
    probed = pa.table({"image_id": ["a", "b", "e"], "uri": ["a.png", "old/b.png", "e.png"], "key": ["K", "K", "old"]})
    failed = pa.table({"image_id": ["c"], "uri": ["c.png"], "key": ["K"]})
    pending, counts = ledger.plan_probe(images, probed, failed, "K")
    # a: decoded before; b: moved, probed again; c: known not to decode; d: new; e: probed with another key.
    assert pending.to_pylist() == [{"image_id": "b", "uri": "new/b.png"}, {"image_id": "d", "uri": "d.png"},
                                   {"image_id": "e", "uri": "e.png"}]
    assert counts == {"images": 5, "skipped": 2, "pending": 3}


def test_unreadable_images_are_those_failed_at_their_current_uri_and_key():
    images = pa.table({"image_id": ["a", "b", "c"], "uri": ["a.png", "fixed/b.png", "c.png"]})
    failed = pa.Table.from_pylist([
        {"image_id": "c", "uri": "c.png", "stage": "probe", "reason": "truncated", "key": "K"},
        {"image_id": "b", "uri": "b.png", "stage": "probe", "reason": "empty file", "key": "K"},  # moved since
        {"image_id": "a", "uri": "a.png", "stage": "probe", "reason": "too large", "key": "small"},  # old limit
        {"image_id": "c", "uri": "c.png", "stage": "probe", "reason": "truncated", "key": "K"},  # a retried batch
        {"image_id": "gone", "uri": "gone.png", "stage": "probe", "reason": "empty file", "key": "K"},
    ], schema=quarantine.QUARANTINE_SCHEMA)
    rows = ledger.unreadable(images, failed, "K")
    assert rows.schema == quarantine.QUARANTINE_SCHEMA
    assert rows.select(["image_id", "reason"]).to_pylist() == [{"image_id": "c", "reason": "truncated"}]


def _index_rows(ids, keys, prefix=""):
    return pa.Table.from_pylist([{"image_id": i, "key": k, "uri": f"{i}.png", "height": 4, "width": 4,
                                  "class_ids": [1], "num_instances": 0, "semantic_uri": f"{prefix}semantic/{i}.png",
                                  "instance_uri": f"{prefix}instance/{i}.png",
                                  "instances_uri": f"{prefix}instances/p.parquet", "fg_fraction": 0.0,
                                  "cam_fraction": 0.0} for i, k in zip(ids, keys)], schema=label_tables.INDEX_SCHEMA)


def test_plan_synthesis_reuses_current_rows_and_labels_the_rest():
    images = _images([("a", "a.png", [1]), ("b", "b.png", [1]), ("c", "c.png", [1]), ("d", "d.png", [1])])
    current = images.append_column("cam_shard", pa.array(["s1"] * 4))
    label = dict(zip(current.column("image_id").to_pylist(),
                     ledger.label_keys("K", current.column("cam_key")).to_pylist()))
    # The base version: a current, b made with other settings, x no longer in the manifest.
    base = _index_rows(["a", "b", "x"], [label["a"], "old", "whatever"])
    labelled = pa.table({"image_id": ["c"], "key": [label["c"]]})  # done in this version already
    failed = pa.table({"image_id": ["d"], "uri": ["d.png"], "key": [label["d"]]})
    reused, pending, counts = ledger.plan_synthesis(current, "K", base, labelled, failed)
    assert reused.column("image_id").to_pylist() == ["a"]
    assert pending.column("image_id").to_pylist() == ["b"]
    assert pending.column("label_key").to_pylist() == [label["b"]]
    assert counts == {"images": 4, "reused": 1, "skipped": 2, "pending": 1}


def test_version_index_points_into_the_base_and_keeps_one_row_per_image():
    current = _images([("a", "a.png", [1]), ("b", "b.png", [1])]).append_column("cam_shard", pa.array(["s", "s"]))
    label = ledger.label_keys("K", current.column("cam_key")).to_pylist()
    reused = _index_rows(["a"], [label[0]], prefix="../v0/")
    own = pa.concat_tables([_index_rows(["b"], [label[1]]), _index_rows(["b"], [label[1]]),
                            _index_rows(["gone"], ["k"])])
    own = own.set_column(own.schema.get_field_index("uri"), "uri", pa.array(["first", "second", "x"]))
    index = ledger.version_index(_index_rows(["a"], [label[0]]), "v1", own, current, "K")
    assert index.column("image_id").to_pylist() == ["a", "b"]
    assert index.column("semantic_uri").to_pylist() == ["../v1/semantic/a.png", "semantic/b.png"]
    assert index.column("uri").to_pylist()[1] == "second"  # the last committed row of b
    # Rows the base itself took from an older version keep pointing there.
    again = ledger.version_index(reused, "v1", own.slice(0, 0), current.slice(0, 1), "K")
    assert again.column("instances_uri").to_pylist() == ["../v0/instances/p.parquet"]


def test_begin_version_resumes_an_unfinished_version_of_the_same_key(tmp_path):
    root = str(tmp_path)
    state = ledger.RunState(root)
    first = ledger.begin_version(state, root, "K", forced=False)
    assert not first["resumed"] and first["base"] is None
    ledger.record_pending(state, first)
    assert ledger.begin_version(state, root, "K", forced=False)["name"] == first["name"]
    assert ledger.begin_version(state, root, "other", forced=False)["resumed"] is False
    ledger.publish_version(state, root, first["name"], {"images": 1})
    assert ledger.latest_version(root) == first["name"] and state.labels["pending"] is None
    assert state.labels["versions"][first["name"]]["images"] == 1
    # A run that stopped after LATEST moved but before run.json said so never resumes it.
    ledger.record_pending(state, first)
    later = ledger.begin_version(state, root, "K", forced=False)
    assert not later["resumed"] and later["base"] == first["name"]
    assert ledger.begin_version(state, root, "K", forced=True)["base"] is None


def test_needs_training_by_policy(tmp_path):
    state = ledger.RunState(str(tmp_path))
    assert ledger.needs_training(state, "cam", "k", policy="auto", forced=False, model_exists=False) == (True, False)
    state.update_stage("train_cam", key="k", run_name="cam-k", trained=True)
    assert ledger.needs_training(state, "cam", "k", policy="auto", forced=False, model_exists=True) == (False, False)
    assert ledger.needs_training(state, "cam", "k2", policy="auto", forced=False, model_exists=True)[0]
    assert not ledger.needs_training(state, "cam", "k2", policy="never", forced=False, model_exists=True)[0]
    assert ledger.needs_training(state, "cam", "k", policy="always", forced=False, model_exists=True)[0]
    state.update_stage("train_cam", trained=False)  # died mid-training: resume it
    assert ledger.needs_training(state, "cam", "k", policy="never", forced=False, model_exists=True) == (True, True)


def test_claiming_stage_outputs_for_a_new_key_discards_the_old(tmp_path):
    root = str(tmp_path)
    state = ledger.RunState(root)
    storage.write_text(str(tmp_path / "cams" / "part-x.parquet"), "x")
    ledger.claim_stage_outputs(state, "cams", "k1", [str(tmp_path / "cams")])
    assert (tmp_path / "cams" / "part-x.parquet").exists()  # first claim: nothing to discard
    ledger.claim_stage_outputs(state, "cams", "k1", [str(tmp_path / "cams")])
    assert (tmp_path / "cams" / "part-x.parquet").exists()
    ledger.claim_stage_outputs(state, "cams", "k2", [str(tmp_path / "cams")])
    assert not (tmp_path / "cams").exists() and state.stage("cams")["key"] == "k2"
    storage.write_text(str(tmp_path / "cams" / "part-y.parquet"), "y")
    ledger.claim_stage_outputs(state, "cams", "k2", [str(tmp_path / "cams")], forced=True)  # --from-stage
    assert not (tmp_path / "cams").exists()


def test_quarantine_rows_carry_their_key(tmp_path):
    root = str(tmp_path)
    quarantine.write_quarantine(root, "cams", [{"image_id": "a", "uri": "a.png", "reason": "broken", "key": "k"}])
    quarantine.write_quarantine(root, "synthesis", [{"image_id": "b", "uri": "b.png", "reason": "failed", "key": "j"}])
    assert quarantine.quarantined(root, "cams").to_pylist() == [{"image_id": "a", "uri": "a.png", "key": "k"}]
    assert quarantine.quarantined(root, "nothing").num_rows == 0
    assert [u.rsplit("/", 1)[-1].split("-")[0] for u in quarantine.quarantine_files(root, "synthesis")] == ["synthesis"]


def test_retain_keeps_what_kept_versions_reference(tmp_path, ray_session):
    from pipeline.stages.export import retain

    root = str(tmp_path)
    state = ledger.RunState(root)
    v1, v2 = layout.labels_dir(root, "v1"), layout.labels_dir(root, "v2")
    for directory, rows in ((v1, _index_rows(["a", "b"], ["k", "k"])),
                            (v2, pa.concat_tables([_index_rows(["a"], ["k"], prefix="../v1/"), _index_rows(["b"], ["k2"])]))):
        codecs.write_parquet(layout.index_file(directory), rows)
        storage.write_text(layout.coco_file(directory), "{}")
    for directory, ids in ((v1, "ab"), (v2, "b")):
        for image_id in ids:
            storage.write_text(layout.semantic_png(directory, image_id), image_id)
            storage.write_text(layout.instance_png(directory, image_id), image_id)
        storage.write_text(storage.join(directory, "instances", "p.parquet"), "rows")
        storage.write_text(storage.join(directory, "instances", "p.coco.tsv"), "part")
        storage.write_text(storage.join(directory, "instances", "orphan.parquet"), "crashed batch")
    storage.write_text(storage.join(layout.labels_dir(root, "v9"), "semantic", "z.png"), "abandoned")
    state.labels["versions"] = {"v1": {}, "v2": {}}
    state.save()
    storage.write_text(layout.latest_pointer(root), "v2\n")
    result = retain(state, root, keep=1)
    assert result["kept"] == ["v2"]
    left = sorted(str(p.relative_to(tmp_path / "labels")) for p in (tmp_path / "labels").rglob("*") if p.is_file())
    assert left == ["LATEST", "v1/instance/a.png", "v1/instances/p.coco.tsv", "v1/instances/p.parquet",
                    "v1/semantic/a.png", "v2/coco.json", "v2/index.parquet", "v2/instance/b.png",
                    "v2/instances/orphan.parquet", "v2/instances/p.coco.tsv", "v2/instances/p.parquet",
                    "v2/semantic/b.png"]
    assert list(json.loads(storage.read_text(layout.run_json(root)))["labels"]["versions"]) == ["v2"]
    with pytest.raises(ValueError, match="keep"):
        retain(state, root, keep=0)


def test_index_summary_counts_and_health_warnings():
    from pipeline.plan import health_warnings, index_summary

    rows = _index_rows(["a", "b", "c", "d"], ["k"] * 4)
    rows = rows.set_column(rows.schema.get_field_index("num_instances"), "num_instances", pa.array([2, 0, 1, 0], pa.int32()))
    rows = rows.set_column(rows.schema.get_field_index("class_ids"), "class_ids",
                           pa.array([[1, 2], [2], [1], []], pa.list_(pa.int32())))
    rows = rows.set_column(rows.schema.get_field_index("fg_fraction"), "fg_fraction", pa.array([0.2, 0.0, 0.1, 0.0], pa.float32()))
    rows = rows.set_column(rows.schema.get_field_index("cam_fraction"), "cam_fraction", pa.array([0.4, 0.3, 0.3, 0.0], pa.float32()))
    summary = index_summary(rows, ["cat", "dog"])
    assert summary["images"] == 4 and summary["instances"] == 3 and summary["images_per_class"] == {"cat": 2, "dog": 2}
    health = summary["health"]
    assert health["tagged_images_all_background"] == pytest.approx(1 / 3)  # b: tagged, labelled nothing
    assert health["foreground_to_cam_area"] == pytest.approx(0.3 / 1.0)
    assert health["instances_per_tag"] == pytest.approx(3 / 4)
    warnings = summary["health_warnings"]
    assert len(warnings) == 2 and "33% of tagged images" in warnings[0] and "0.30x" in warnings[1]
    assert health_warnings({"tagged_images_all_background": 0.0, "foreground_to_cam_area": 1.1,
                            "instances_per_tag": 1.5}) == []
