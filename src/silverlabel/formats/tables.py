"""Parquet schemas of the dataset tables (DESIGN.md) and their atomic writing.

    >>> SAMPLES_SCHEMA.field("status").type
    DataType(string)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from silverlabel.dataset import atomic_write, display, parquet_source
from silverlabel.errors import UserError

SAMPLES_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("id", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("imagehash", pa.string()),
        ("shard", pa.string()),
        ("source", pa.string()),  # where the bytes came from: URL, path relative to the source, or tar#key
        ("label", pa.string()),  # human label from the source (ImageFolder class, .cls), if any
    ]
)


#: integer columns :func:`column_array` builds itself: arrow type -> (numpy dtype, min, max)
_INT_TYPES = {pa.int32(): ("<i4", -(1 << 31), (1 << 31) - 1), pa.int64(): ("<i8", -(1 << 63), (1 << 63) - 1)}

#: the most bytes a ``string`` column (32-bit offsets) holds; more: pyarrow's own converter
_STRING_MAX_BYTES = (1 << 31) - 1


def _validity(present: list[bool], nulls: int) -> pa.Buffer | None:
    """Arrow's validity bitmap (bit i set: value i is there), None when nothing is null."""
    if not nulls:
        return None
    return pa.py_buffer(np.packbits(np.array(present, dtype=bool), bitorder="little").tobytes())


def _string_array(values: list[Any]) -> pa.Array | None:
    if any(v is not None and type(v) is not str for v in values):
        return None
    try:
        encoded = [b"" if v is None else v.encode() for v in values]
    except UnicodeEncodeError:  # a lone surrogate: pyarrow's converter says why
        return None
    offsets = np.zeros(len(values) + 1, dtype="<i8")
    offsets[1:] = np.cumsum(np.array([len(b) for b in encoded], dtype="<i8"))
    if offsets[-1] > _STRING_MAX_BYTES:
        return None
    present = [v is not None for v in values]
    nulls = len(values) - sum(present)
    return pa.Array.from_buffers(pa.string(), len(values), [_validity(present, nulls), pa.py_buffer(
        offsets.astype("<i4").tobytes()), pa.py_buffer(b"".join(encoded))], null_count=nulls)


def _int_array(values: list[Any], arrow_type: pa.DataType) -> pa.Array | None:
    dtype, low, high = _INT_TYPES[arrow_type]
    if any(v is not None and (type(v) is not int or not low <= v <= high) for v in values):
        return None
    present = [v is not None for v in values]
    nulls = len(values) - sum(present)
    data = np.array([0 if v is None else v for v in values], dtype=dtype)
    return pa.Array.from_buffers(arrow_type, len(values), [_validity(present, nulls), pa.py_buffer(data.tobytes())],
                                 null_count=nulls)


def column_array(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
    """``pa.array(values, type=arrow_type)``, the same array, without pyarrow's converter from
    Python objects where it can: that converter imports pandas the first time it runs (to
    ask whether ``values`` is a pandas object; ~0.2 s, in every worker process otherwise).
    Built directly from Arrow buffers for ``string``, ``int32`` and ``int64`` columns whose
    values are exactly ``str``/``int`` or None (the samples table's own); anything else
    (another type, a ``bool`` or ``float`` in an integer column, an integer out of range, a
    string that is not UTF-8) goes through ``pa.array``, which converts it or raises as
    before.

        >>> column_array(["a", None, "ü"], pa.string()).equals(pa.array(["a", None, "ü"], type=pa.string()))
        True
        >>> column_array([3, None], pa.int32()).to_pylist()
        [3, None]
    """
    built: pa.Array | None = None
    if arrow_type == pa.string():
        built = _string_array(values)
    elif arrow_type in _INT_TYPES:
        built = _int_array(values, arrow_type)
    return built if built is not None else pa.array(values, type=arrow_type)


def samples_table(rows: list[dict[str, Any]], extra_fields: list[pa.Field] | None = None) -> pa.Table:
    """Build a samples table with the fixed schema plus carried-through columns."""
    schema = SAMPLES_SCHEMA
    for f in extra_fields or []:
        schema = schema.append(f)
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    arrays = []
    for f in schema:
        try:
            arrays.append(column_array(columns[f.name], f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise UserError(f"column {f.name!r} cannot be stored as {f.type}: {e}") from e
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``table`` to ``path`` via a temporary name, fsync and rename."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_write(path) as f:
        pq.write_table(table, f, compression="zstd")


def read_parquet_metadata(path: Path) -> dict[str, str]:
    """The key/value metadata of a parquet file's schema, decoded."""
    md = pq.read_schema(parquet_source(path)).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items()}


def check_parquet(path: str | Path) -> None:
    """A UserError naming ``path`` when it is missing or its parquet footer is not readable
    (a truncated or overwritten file)."""
    try:
        pq.read_metadata(parquet_source(path))  # at a URL: the footer, by ranged reads
    except FileNotFoundError:
        raise UserError(f"{display(path)}: parquet file not found") from None
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{display(path)}: not a readable parquet file ({str(e).splitlines()[0]})") from None
