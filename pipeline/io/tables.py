"""Arrow tables over many Parquet shards: read their columns as one table, and join rows on keys
(the anti-joins and lookups the run's bookkeeping is made of, ``pipeline.ledger``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.io import codecs


def read_shards(uris: list[str], columns: list[str], *, shard_column: str | None = None) -> pa.Table:
    """``columns`` of many Parquet shards as one table (range reads, 16 at a time).

    Columns a shard lacks (written before they existed) are null. With ``shard_column``, each row
    also gets the file name of its shard.
    """
    def one(uri: str) -> pa.Table:
        table = codecs.read_parquet_columns(uri, columns, missing_ok=True)
        for column in columns:
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
        table = table.select(columns)
        if shard_column:
            table = table.append_column(shard_column, pa.array([uri.rsplit("/", 1)[-1]] * table.num_rows, pa.string()))
        return table

    with ThreadPoolExecutor(16) as pool:
        tables = list(pool.map(one, uris))
    if not tables:
        names = columns + ([shard_column] if shard_column else [])
        return pa.table({c: pa.array([], pa.string()) for c in names})
    return pa.concat_tables(tables, promote_options="permissive")


def join_rows(left: pa.Table, right: pa.Table, keys: list[str], how: str, extra: list[str] = ()) -> pa.Table:
    """Rows of ``left`` that have ("left semi", "inner") or lack ("left anti") a row of ``right``
    with equal ``keys``, in ``left``'s order; "inner" also appends ``right``'s ``extra`` columns
    (from one matching row). Any column types (Arrow's join takes no list payloads)."""
    if left.num_rows == 0:
        return left if how != "inner" else _with_columns(left, {c: pa.array([], pa.string()) for c in extra})
    index = pa.table({**{k: left.column(k) for k in keys}, "__row": pa.array(np.arange(left.num_rows))})
    side = right.select(list(keys) + list(extra))
    if how == "inner" and extra:  # one row per key, so no left row is repeated
        side = side.group_by(list(keys)).aggregate([(c, "max") for c in extra]).rename_columns(
            list(keys) + list(extra))
    else:
        side = side.select(list(keys)).group_by(list(keys)).aggregate([])
    joined = index.join(side, keys=list(keys), join_type="left semi" if how == "inner" and not extra else how)
    joined = joined.sort_by("__row")
    rows = left.take(joined.column("__row"))
    return _with_columns(rows, {c: joined.column(c) for c in extra}) if how == "inner" else rows


def _with_columns(table: pa.Table, columns: dict[str, Any]) -> pa.Table:
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order and types; a column the table
    lacks (rows written before it existed) is null."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)
