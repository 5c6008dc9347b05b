"""jobs.correct on a copy of the session's labelled run: a corrected COCO file (as jobs.review
writes it, edited) or VOC folder is validated whole and stored immutably; the newest correction
of an image wins; a bad file is refused in one line with nothing stored."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import correct, export, label, review
from pipeline import label_tables, ledger, plan
from pipeline.io import codecs, layout, storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def run_root(labelled, tmp_path):
    """A copy of the labelled run (its models and checkpoints left out): corrections are written here."""
    root = tmp_path / "run"
    shutil.copytree(labelled["root"], root, ignore=shutil.ignore_patterns("models"))
    return str(root)


def _stored(root: str) -> list[str]:
    return storage.list_dirs(layout.corrections_root(root))


def current_corrections(root: str):
    """plan.current_corrections with the URIs made absolute."""
    table = plan.current_corrections(root)
    rows = table.to_pylist()
    for row in rows:
        for column in label_tables.URI_COLUMNS:
            row[column] = storage.resolve(row[column], layout.correction_dir(root, row["correction"]))
    return rows


def _manifest_dir(root: str) -> str:
    return layout.manifest_dir(root, json.loads(storage.read_text(layout.run_json(root)))["manifest"]["stamp"])


def _held_out(root: str) -> set[str]:
    manifest = plan.read_manifest(_manifest_dir(root), ["image_id", "held_out"]).to_pylist()
    return {r["image_id"] for r in manifest if r["held_out"]}


def training_corrections(root: str) -> pa.Table:
    return plan.training_corrections(root, _manifest_dir(root))


def _png(uri: str) -> np.ndarray:
    return codecs.decode_label_png(storage.read_bytes(uri))


def test_a_reviewed_and_edited_coco_file_is_stored_and_the_newest_correction_wins(run_root, tmp_path):
    review.main(["--root", run_root, "--worst", "3", "--out", str(tmp_path / "review")])
    document = json.loads((tmp_path / "review" / "annotations.json").read_text())
    first, second, third = document["images"]
    # The annotator deletes one instance of the first image and every instance of the third.
    dropped = next(a["id"] for a in document["annotations"] if a["image_id"] == first["id"])
    document["annotations"] = [a for a in document["annotations"]
                               if a["id"] != dropped and a["image_id"] != third["id"]]
    (tmp_path / "fixed.json").write_text(json.dumps(document))
    name = correct.main(["--root", run_root, "--from", str(tmp_path / "fixed.json"), "--note", "first pass"])
    first_digest = plan.training_corrections_digest(training_corrections(run_root))
    table = current_corrections(run_root)
    by_id = {r["image_id"]: r for r in table}
    ids = [im["file_name"].rsplit(".", 1)[0] for im in (first, second, third)]
    assert sorted(by_id) == sorted(ids) and all(r["note"] == "first pass" for r in table)
    assert not _png(by_id[ids[2]]["semantic_uri"]).any()  # no instance left: background
    assert by_id[ids[2]]["num_instances"] == 0
    kept = [a for a in document["annotations"] if a["image_id"] == first["id"]]
    assert by_id[ids[0]]["num_instances"] == len(kept)
    instance = _png(by_id[ids[1]]["instance_uri"])
    assert instance.max() == by_id[ids[1]]["num_instances"] == sum(a["image_id"] == second["id"]
                                                                    for a in document["annotations"])
    # A second correction gives the third image one square: it replaces the first correction for
    # that image only.
    height, width = third["height"], third["width"]
    square = [2, 2, 10, 2, 10, 10, 2, 10]
    redo = {"images": [third], "categories": document["categories"],
            "annotations": [{"id": 1, "image_id": third["id"], "category_id": 1, "segmentation": [square]}]}
    (tmp_path / "redo.json").write_text(json.dumps(redo))
    later = correct.main(["--root", run_root, "--from", str(tmp_path / "redo.json")])
    assert later > name and len(_stored(run_root)) == 2
    by_id = {r["image_id"]: r for r in current_corrections(run_root)}
    assert by_id[ids[2]]["num_instances"] == 1 and by_id[ids[0]]["note"] == "first pass"
    # IRNet trains on the newest correction of each image it may train on (not held out), and
    # its key changes with it.
    training = {r["image_id"]: r["correction"] for r in training_corrections(run_root).to_pylist()}
    held_out = _held_out(run_root)
    assert training == {i: later if i == ids[2] else name for i in ids if i not in held_out}
    assert plan.training_corrections_digest(training_corrections(run_root)) != first_digest
    # The same file again (an annotation tool's export taken each night) stores nothing; the first
    # file again stores only the image whose stored correction it no longer equals.
    assert correct.main(["--root", run_root, "--from", str(tmp_path / "redo.json")]) is None
    assert len(_stored(run_root)) == 2
    again = correct.main(["--root", run_root, "--from", str(tmp_path / "fixed.json")])
    assert len(_stored(run_root)) == 3 and [r["image_id"] for r in plan.current_corrections(run_root).to_pylist()
                                            if r["correction"] == again] == [ids[2]]
    assert not _png(current_corrections(run_root)[sorted(ids).index(ids[2])]["semantic_uri"]).any()
    semantic = _png(by_id[ids[2]]["semantic_uri"])
    assert semantic.shape == (height, width) and semantic[2:10, 2:10].all() and semantic.sum() == 64


def test_a_voc_folder_is_taken_as_it_is(run_root, tmp_path):
    export.main(["--root", run_root, "--format", "voc", "--out", str(tmp_path / "voc")])
    correct.main(["--root", run_root, "--from", str(tmp_path / "voc")])
    version = ledger.latest_version(run_root)
    labels_dir = layout.labels_dir(run_root, version)
    index = {r["image_id"]: r for r in label_tables.read_index(labels_dir).to_pylist()}
    stored = current_corrections(run_root)
    assert sorted(r["image_id"] for r in stored) == sorted(index)
    for row in stored:
        labels = _png(storage.resolve(index[row["image_id"]]["semantic_uri"], labels_dir))
        assert np.array_equal(_png(row["semantic_uri"]), labels)
        assert row["num_instances"] == index[row["image_id"]]["num_instances"]


def _refused(root: str, source: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "jobs.correct", "--root", root, "--from", str(source)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("correction error: ") and lines[0].endswith("nothing was stored")
    assert not _stored(root)
    return lines[0]


def test_bad_correction_files_are_refused_in_one_line_with_nothing_stored(run_root, tmp_path):
    review.main(["--root", run_root, "--worst", "1", "--out", str(tmp_path / "review")])
    good = json.loads((tmp_path / "review" / "annotations.json").read_text())
    (image,) = good["images"]

    def variant(name: str, document) -> Path:
        path = tmp_path / name
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        return path

    text = json.dumps(good)
    assert "not a JSON document" in _refused(run_root, variant("truncated.json", text[: len(text) // 2]))
    unknown = {**good, "images": [{**image, "file_name": "no-such-image.png"}]}
    assert "'no-such-image.png' is not in the run's manifest" in _refused(run_root, variant("id.json", unknown))
    alien = {**good, "categories": [{"id": 1, "name": "unicorn"}]}
    assert "category 'unicorn'" in _refused(run_root, variant("class.json", alien))
    outside = [image["width"] + 5, 0, image["width"] + 9, 0, image["width"] + 9, 4]
    off = {**good, "annotations": [{"id": 7, "image_id": image["id"], "category_id": 1, "segmentation": [outside]}]}
    assert "annotation 7" in _refused(run_root, variant("off.json", off))
    sized = {**good, "images": [{**image, "width": image["width"] + 1}]}
    assert "the image is" in _refused(run_root, variant("size.json", sized))


def test_corrections_stick_verbatim_in_the_next_version_and_every_later_one(labelled, tmp_path):

    root = str(tmp_path / "run")
    shutil.copytree(labelled["root"], root)
    rerun = labelled["args"] + ["--set", f"run.root={root}", "--only", "synthesis", "--only", "publish"]
    before = ledger.latest_version(root)
    review.main(["--root", root, "--worst", "2", "--out", str(tmp_path / "review")])
    document = json.loads((tmp_path / "review" / "annotations.json").read_text())
    square, empty = document["images"]
    document["annotations"] = [{"id": 1, "image_id": square["id"], "category_id": 1,
                                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}]
    (tmp_path / "fixed.json").write_text(json.dumps(document))
    name = correct.main(["--root", root, "--from", str(tmp_path / "fixed.json")])
    corrected = {r["image_id"]: r for r in current_corrections(root)}

    label.main(rerun)
    version = ledger.latest_version(root)
    assert version != before  # the corrections alone make a new version
    labels_dir = layout.labels_dir(root, version)
    index = {r["image_id"]: r for r in label_tables.read_index(labels_dir).to_pylist()}
    previous = {r["image_id"]: r for r in label_tables.read_index(layout.labels_dir(root, before)).to_pylist()}
    assert sorted(index) == sorted(previous)
    for image_id, row in index.items():
        if image_id not in corrected:
            assert row["source"] == "irnet" and row["correction"] is None
            assert row["semantic_uri"] == label_tables.relative_to_sibling(pa.array([previous[image_id]["semantic_uri"]]),
                                                                     before).to_pylist()[0]
            continue
        assert row["source"] == "human" and row["correction"] == name and row["doubt"] == 0
        assert row["key"] == previous[image_id]["key"]  # IRNet's labels of it are still current
        for column in ("semantic_uri", "instance_uri"):
            assert np.array_equal(_png(storage.resolve(row[column], labels_dir)), _png(corrected[image_id][column]))
        instances = codecs.read_parquet(storage.resolve(row["instances_uri"], labels_dir)).to_pylist()
        assert [r["score"] for r in instances if r["image_id"] == image_id] == [1.0] * row["num_instances"]
    image_id = square["file_name"].rsplit(".", 1)[0]
    assert index[image_id]["num_instances"] == 1 and _png(corrected[image_id]["semantic_uri"]).sum() == 100
    coco = json.loads(storage.read_text(layout.coco_file(labels_dir)))
    sources = {im["file_name"]: im["source"] for im in coco["images"]}
    assert {k for k, v in sources.items() if v == "human"} == set(corrected)
    assert sum(a["image_id"] == next(im["id"] for im in coco["images"] if im["file_name"] == image_id)
               for a in coco["annotations"]) == 1

    label.main(rerun)  # nothing changed: no new version, the corrections still in force
    assert ledger.latest_version(root) == version
    export.main(["--root", root, "--format", "coco", "--out", str(tmp_path / "export")])
    with open(tmp_path / "export" / "sources.csv") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    assert {k for k, r in rows.items() if r["source"] == "human"} == set(corrected)
    assert all(rows[k]["correction"] == name for k in corrected)


def test_corrections_retrain_irnet_and_every_other_image_is_relabelled(labelled, tmp_path):
    """benchmarks/corrections.py's annotator on the session's run: the ground truth of the images
    most in doubt goes in as a VOC correction. With run.retrain=never it sticks and nothing
    retrains (the set's scores equal the benchmark's by-hand computation); with auto IRNet
    retrains on the corrections' exact relation labels and every other image is relabelled by
    it; a rerun then does nothing. The gains are measured in docs/review.md."""
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "corrections.py"))
    base = labelled["root"]
    base_state = json.loads(storage.read_text(layout.run_json(base)))
    classes = base_state["manifest"]["classes"]
    truth = bench["ground_truth"](base)
    ids = bench["choose"](base, truth, 0.25, "doubt", 0)
    assert len(ids) >= 2 and set(ids) <= set(truth)
    base_parts = bench["image_parts"](base, truth, classes)
    perfect = bench["image_parts"](base, truth, classes, perfect=True)

    root = bench["relabel"](base, tmp_path / "stick", labelled["args"], seed=0, ids=ids, truth=truth, retrain="never")
    stick_version = ledger.latest_version(root)
    state = json.loads(storage.read_text(layout.run_json(root)))
    assert state["stages"]["train_irn"]["key"] == base_state["stages"]["train_irn"]["key"]
    stuck = bench["image_parts"](root, truth, classes)
    assert all(np.array_equal(stuck[i][0], perfect[i][0]) for i in ids)  # the corrected images are exact
    assert bench["combine"](stuck, base_parts) == bench["corrected_by_hand"](base_parts, perfect, ids)

    label.main(labelled["args"] + ["--set", f"run.root={root}"])  # run.retrain: auto
    state = json.loads(storage.read_text(layout.run_json(root)))
    assert state["stages"]["train_irn"]["key"] != base_state["stages"]["train_irn"]["key"]
    table, _ = plan.irn_training_rows(root, _manifest_dir(root), classes, state["stages"]["cams"]["key"],
                                      training_corrections(root))
    exact = [r for r in table.to_pylist() if r["instance_uri"]]
    assert len(exact) == len(set(ids) - _held_out(root)) > 0
    assert all("/corrections/" in r["relation_uri"] and "/corrections/" in r["instance_uri"] for r in exact)

    retrained = ledger.latest_version(root)
    before = {r["image_id"]: r for r in label_tables.read_index(layout.labels_dir(root, stick_version)).to_pylist()}
    after = {r["image_id"]: r for r in label_tables.read_index(layout.labels_dir(root, retrained)).to_pylist()}
    assert retrained != stick_version and sorted(before) == sorted(after)
    for image_id, row in after.items():
        if image_id in ids:
            assert row["source"] == "human" and row["semantic_uri"].startswith("../../corrections/")
        else:  # relabelled by the new IRNet: a new label key
            assert row["source"] == "irnet" and row["key"] != before[image_id]["key"]
    assert f"<td>corrected by people</td><td>{len(ids)}</td>" in storage.read_text(layout.report_file(root))

    label.main(labelled["args"] + ["--set", f"run.root={root}"])  # nothing new: no retraining, no version
    again = json.loads(storage.read_text(layout.run_json(root)))
    assert again["stages"]["train_irn"]["key"] == state["stages"]["train_irn"]["key"]
    assert ledger.latest_version(root) == retrained
