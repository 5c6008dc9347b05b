"""Byte formats of the run root: label PNGs and Parquet tables with array columns.

- Semantic labels: 8-bit palette PNG with the PASCAL VOC colour map (0 = background,
  1..C = classes, 255 = ignore), readable as class ids by any PNG reader that keeps the palette index.
- Instance ids: 16-bit greyscale PNG (0 = no instance), so more than 255 instances fit.
- Array fields in Parquet: a ``list<float16>`` (or other dtype) column holding the flattened values
  plus a ``<name>_shape`` ``list<int32>`` column; reading gives back the exact array.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io import storage


def voc_palette() -> np.ndarray:
    """uint8 [256, 3]: the PASCAL VOC colour map (bit-interleaved class index)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()


def encode_semantic_png(labels: np.ndarray) -> bytes:
    """labels: uint8 [H, W] (0 bg, 1..C classes, 255 ignore) -> palette PNG bytes."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"semantic labels must be uint8 [H, W], got {labels.dtype} {labels.shape}")
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
    image.putpalette(VOC_PALETTE.reshape(-1).tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_instance_png(ids: np.ndarray) -> bytes:
    """ids: integer [H, W] in 0..65535 (0 = none) -> 16-bit greyscale PNG bytes."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"instance ids must be an integer [H, W] array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 65535):
        raise ValueError("instance ids must lie in 0..65535")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """PNG bytes of a label map -> integer [H, W] of the stored values (palette indices for 'P').

    8-bit maps come back as uint8, 16-bit maps as uint16.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("P", "L"):
            return np.array(image, dtype=np.uint8)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.array(image)
            return arr.astype(np.uint16)
        raise ValueError(f"label PNG has mode {image.mode!r}; expected P, L or 16-bit greyscale")


def array_columns(name: str, arrays: list[np.ndarray], dtype: np.dtype | str = np.float16) -> dict[str, pa.Array]:
    """Columns ``name`` (flattened values as list<dtype>) and ``name_shape`` for one array per row."""
    dtype = np.dtype(dtype)
    flat = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    if flat:
        offsets[1:] = np.cumsum([f.size for f in flat])
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0, dtype=dtype))
    return {
        name: pa.LargeListArray.from_arrays(pa.array(offsets), values),
        f"{name}_shape": pa.array([list(a.shape) for a in arrays], type=pa.list_(pa.int32())),
    }


def read_array(table: pa.Table, name: str, row: int) -> np.ndarray:
    """The array stored by :func:`array_columns` in row ``row`` of ``table``."""
    values = table.column(name)[row].values.to_numpy(zero_copy_only=False)
    shape = table.column(f"{name}_shape")[row].as_py()
    return values.reshape(shape)


def table_to_parquet_bytes(table: pa.Table, *, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    return buf.getvalue()


def parquet_bytes_to_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def write_parquet(uri: str, table: pa.Table, *, row_group_size: int | None = None) -> None:
    """Write ``table`` to ``uri`` atomically (see :mod:`pipeline.io.storage`). Small row groups
    (with rows sorted by a key) let filtered reads skip most of a large shard."""
    storage.write_bytes(uri, table_to_parquet_bytes(table, row_group_size=row_group_size))


def read_parquet(uri: str, *, filters=None) -> pa.Table:
    """A Parquet file; with ``filters`` (pyarrow DNF, e.g. [("image_id", "in", ids)]) only the
    matching rows, reading just the row groups whose statistics may hold them."""
    if filters is None:
        return parquet_bytes_to_table(storage.read_bytes(uri))
    with storage.open_input(uri) as f:
        return pq.read_table(f, filters=filters)


def read_parquet_columns(uri: str, columns: list[str], *, missing_ok: bool = False) -> pa.Table:
    """Only ``columns`` of the Parquet file at ``uri`` (range reads: other columns are not fetched).

    With ``missing_ok``, columns the file does not have (an older shard) are left out.
    """
    with storage.open_input(uri) as f:
        parquet = pq.ParquetFile(f)
        if missing_ok:
            columns = [c for c in columns if c in parquet.schema_arrow.names]
        return parquet.read(columns=columns)
