"""Parquet schemas of the dataset tables (DESIGN.md) and their atomic writing.

    >>> SAMPLES_SCHEMA.field("status").type
    DataType(string)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def samples_table(rows: list[dict[str, Any]], extra_fields: list[pa.Field] | None = None) -> pa.Table:
    """Build a samples table with the fixed schema plus carried-through columns."""
    schema = SAMPLES_SCHEMA
    for f in extra_fields or []:
        schema = schema.append(f)
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    arrays = []
    for f in schema:
        try:
            arrays.append(pa.array(columns[f.name], type=f.type))
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
