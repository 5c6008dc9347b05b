"""Manifests: read (Parquet, CSV, JSON Lines), resolve URIs, validate row by row.

A manifest row names one image: ``image_id``, ``uri`` and ``labels`` (class names), optionally
``split``, ``gt_semantic_uri``, ``gt_instance_uri`` and ``gt_instance_classes`` (the class name of
instance id i at position i-1). Validation never raises for the set: each bad row becomes a
quarantine record with a reason, and the rest go on.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa

from pipeline.io import storage

# No leading '.': besides '.' and '..', hidden names such as '.tmp-*' are skipped by listings.
SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")
URI_FIELDS = ("uri", "gt_semantic_uri", "gt_instance_uri")


@dataclass
class ManifestRow:
    image_id: str
    uri: str
    labels: list[str]
    split: str = ""
    gt_semantic_uri: str = ""
    gt_instance_uri: str = ""
    gt_instance_classes: list[str] = field(default_factory=list)

    @property
    def has_ground_truth(self) -> bool:
        return bool(self.gt_semantic_uri or self.gt_instance_uri)


@dataclass
class QuarantineRecord:
    image_id: str
    uri: str
    stage: str
    reason: str


MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("labels", pa.list_(pa.string())),
    ("split", pa.string()), ("gt_semantic_uri", pa.string()), ("gt_instance_uri", pa.string()),
    ("gt_instance_classes", pa.list_(pa.string())),
])


def is_safe_id(image_id: Any) -> bool:
    """True if ``image_id`` may name output files: 1-200 chars of [A-Za-z0-9._-], not starting with '.'."""
    return isinstance(image_id, str) and bool(SAFE_ID.fullmatch(image_id))  # '$' alone would pass "a\n"


def _parse_list(value: Any) -> list[str] | None:
    """A list of names from a list, a JSON list string, or 'a;b' / 'a|b' / 'a b'; None if malformed."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value] if all(isinstance(v, str) for v in value) else None
    if hasattr(value, "tolist"):
        return _parse_list(value.tolist())
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                return None
            return _parse_list(parsed) if isinstance(parsed, list) else None
        return [part for part in re.split(r"[;|\s]+", text) if part]
    return None


def read_manifest_records(uri: str) -> list[dict[str, Any]]:
    """Raw records of a manifest by extension: .parquet, .csv, .jsonl/.ndjson/.json.

    A JSON Lines line that does not parse becomes a record with a ``_error`` key, so the
    validation can quarantine it with the line number.
    """
    return list(iter_manifest_records(uri))


def manifest_format(uri: str) -> str:
    lower = uri.lower()
    for suffixes, kind in (((".parquet",), "parquet"), ((".csv",), "csv"), ((".jsonl", ".ndjson", ".json"), "jsonl")):
        if lower.endswith(suffixes):
            return kind
    raise ValueError(f"manifest {uri!r}: unknown format; use .parquet, .csv or .jsonl")


def iter_manifest_records(uri: str, *, row_group: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream the raw records of a manifest (one Parquet row group when ``row_group`` is given)."""
    kind = manifest_format(uri)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with storage.open_input(uri) as f:
            parquet = pq.ParquetFile(f)
            groups = range(parquet.num_row_groups) if row_group is None else [row_group]
            for group in groups:
                yield from parquet.read_row_group(group).to_pylist()
        return
    with storage.open_input(uri) as f:
        if kind == "csv":
            # Bad bytes become U+FFFD: the row's id or class is then invalid and the row quarantined.
            yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline=""))
            return
        # Decoded line by line: one line of bad bytes is one quarantined row, not a failed set.
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as err:
                yield {"_error": f"line {number} is not valid UTF-8 (byte {err.start})"}
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield {"_error": f"line {number} is not valid JSON ({err.msg})"}
                continue
            yield record if isinstance(record, dict) else {"_error": f"line {number} is not a JSON object"}


def row_from_record(record: dict[str, Any], base_dir: str) -> tuple[ManifestRow | None, str]:
    """A ManifestRow, or (None, reason) for a row that cannot be one."""
    if "_error" in record:
        return None, f"malformed manifest row: {record['_error']}"
    image_id, uri = record.get("image_id"), record.get("uri")
    if image_id is None or (isinstance(image_id, str) and not image_id.strip()):
        return None, "missing image_id"
    if not isinstance(image_id, str):
        return None, f"image_id must be a string, got {type(image_id).__name__}"
    if not is_safe_id(image_id):
        return None, (f"image_id {image_id!r} has unsafe characters; use only A-Z a-z 0-9 . _ - "
                      f"(at most 200, not starting with '.')")
    if not isinstance(uri, str) or not uri.strip():
        return None, "missing uri"
    labels = _parse_list(record.get("labels"))
    if labels is None:
        return None, f"labels must be a list of class names, got {record.get('labels')!r}"
    gt_classes = _parse_list(record.get("gt_instance_classes"))
    if gt_classes is None:
        return None, f"gt_instance_classes must be a list of class names, got {record.get('gt_instance_classes')!r}"
    row = ManifestRow(image_id=image_id, uri=storage.resolve(uri.strip(), base_dir),
                      labels=sorted(set(labels)), split=str(record.get("split") or ""),
                      gt_instance_classes=gt_classes)
    for name in ("gt_semantic_uri", "gt_instance_uri"):
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            setattr(row, name, storage.resolve(value.strip(), base_dir))
    return row, ""


def validate_records(records: Iterable[dict[str, Any]], base_dir: str, classes: list[str] | None = None,
                     ) -> tuple[list[ManifestRow], list[QuarantineRecord], list[str]]:
    """Split raw records into valid rows and quarantine records; return (rows, quarantine, classes).

    ``classes`` empty or None: the class list is the sorted union of the valid rows' labels.
    Otherwise a row with a label (or gt instance class) outside it is quarantined. The first row
    with a given image_id wins; later duplicates are quarantined.
    """
    rows: list[ManifestRow] = []
    quarantine: list[QuarantineRecord] = []
    first_seen: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        row, reason = row_from_record(record, base_dir)
        if row is not None and row.image_id in first_seen:
            row, reason = None, f"duplicate image_id (first used by manifest row {first_seen[row.image_id]})"
        if row is None:
            image_id = record.get("image_id")
            quarantine.append(QuarantineRecord(image_id=str(image_id) if image_id is not None else "",
                                               uri=str(record.get("uri") or ""), stage="manifest",
                                               reason=f"row {number}: {reason}"))
            continue
        first_seen[row.image_id] = number
        rows.append(row)
    if classes:
        known = set(classes)
        kept = []
        for row in rows:
            unknown = sorted((set(row.labels) | set(row.gt_instance_classes)) - known)
            if unknown:
                quarantine.append(QuarantineRecord(row.image_id, row.uri, "manifest",
                                                   f"unknown class(es) {unknown}; known: data.classes"))
            else:
                kept.append(row)
        return kept, quarantine, list(classes)
    return rows, quarantine, sorted({label for row in rows for label in row.labels})


def load_manifest(uri: str, classes: list[str] | None = None,
                  ) -> tuple[list[ManifestRow], list[QuarantineRecord], list[str]]:
    """Read and validate the manifest at ``uri`` (relative URIs resolve against its directory)."""
    return validate_records(read_manifest_records(uri), storage.parent(uri), classes)


def rows_to_table(rows: list[ManifestRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in rows], schema=MANIFEST_SCHEMA)
