"""URL tables: parquet, csv, tsv, jsonl (optionally .gz): one file, a folder of them, or a
brace pattern (``part-{00000..00009}.parquet``).

Columns are found by name (``url``, ``caption``, ``uid``, ``id`` by default). When no
caption column is named and the table has no ``caption``, ``text`` is used: that is the
caption column of both COYO-700M and DataComp metadata, so their files work unchanged.
Tables are streamed in record batches, never loaded whole.

    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "t.parquet")
    >>> pq.write_table(pa.table({"url": ["http://a/x.jpg", ""], "text": ["a cat", None]}), p)
    >>> [(i.url, i.caption, i.error) for i in TableSource(p, SourceOptions()).items()]
    [('http://a/x.jpg', 'a cat', None), (None, None, 'empty url')]
"""

from __future__ import annotations

import bisect
import csv
import gzip
import io
import json
import os
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from silverlabel import fs
from silverlabel.errors import UserError
from silverlabel.sources import (
    KIND_URL,
    TABLE_SUFFIXES,
    Item,
    SourceOptions,
    check_keep_cols,
    derive_uid,
    describe_location,
    normalize_uid,
    pattern_files,
    register_source,
)

BATCH_ROWS = 65_536


def _is_stats_beside_shard(names: set[str], name: str) -> bool:
    """img2dataset's ``00000_stats.json`` beside its ``00000.parquet`` (``names``: the
    folder's entries): its counts, not a table."""
    m = re.match(r"^(\d+)_stats\.json$", name)
    return m is not None and m.group(1) + ".parquet" in names


def _name(path: str) -> str:
    """The lower-cased name that says a file's format (a URL's query left out)."""
    return fs.basename(path).lower() if fs.is_remote(path) else path.lower()


def _table_files(path: str) -> list[str]:
    if fs.isdir(path):
        names = {n for n, d in fs.listdir(path) if not d}
        files = [
            fs.join(path, n)
            for n in sorted(names)
            if not n.startswith(".") and (n[:-3] if n.endswith(".gz") else n).lower().endswith(TABLE_SUFFIXES)
            and not _is_stats_beside_shard(names, n)
        ]
        if not files:
            raise UserError(f"{fs.public(path)}: folder holds no parquet/csv/tsv/jsonl files")
        return files
    return pattern_files(path)


def _format_of(path: str) -> str:
    name = _name(path)
    name = name[:-3] if name.endswith(".gz") else name
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise UserError(f"{fs.public(path)}: unknown table format (use .parquet, .csv, .tsv, .jsonl, optionally .gz)")


def _open_text(path: str) -> io.TextIOBase:
    """UTF-8 text (a leading byte-order mark, as Excel writes, is dropped); a remote file
    streamed (:func:`silverlabel.fs.open_input`)."""
    if not fs.is_remote(path):
        if path.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    raw = fs.open_input(path)
    if _name(path).endswith(".gz"):
        return io.TextIOWrapper(_ClosingGzip(raw), encoding="utf-8-sig", newline="")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


class _ClosingGzip(gzip.GzipFile):
    """A gzip stream over a file object that closes that file too."""

    def __init__(self, raw):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def _input_stream(path: str) -> pa.NativeFile:
    """A byte stream of a CSV/TSV file for pyarrow, gunzipped when its name ends in ``.gz``."""
    if not fs.is_remote(path):
        return pa.input_stream(path, compression="detect")
    return pa.input_stream(fs.open_input(path), compression="gzip" if _name(path).endswith(".gz") else None)


#: What reading a damaged table raises: bad gzip streams, bad UTF-8, bad CSV.
_READ_ERRORS = (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error)


def _read_error(path: str, e: BaseException) -> UserError:
    path = fs.public(path)
    if isinstance(e, UnicodeDecodeError):
        why = f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); save it as UTF-8"
    else:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"{path}: cannot read this table: {why}")


def _unclosed_quote_line(path: str, delim: str) -> int | None:
    """The line where a quote opens that never closes (so pyarrow read the rest of the file
    as one value), or None. Python's csv module in strict mode stops there."""
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delim, strict=True)
        start = 1
        try:
            for _ in reader:
                start = reader.line_num + 1
        except csv.Error:
            return start
    return None


def _batches(path: str, columns: list[str] | None = None) -> tuple[pa.Schema, Iterator[list[dict[str, Any]]]]:
    """The file's schema and an iterator over batches of rows (dicts)."""
    fmt = _format_of(path)
    if fmt == "parquet":
        src = fs.readable(path)
        try:
            pf = pq.ParquetFile(src)
        except Exception as e:
            raise UserError(fs.scrub_text(f"{fs.public(path)}: not a readable parquet file ({e})")) from None
        schema = pf.schema_arrow

        def gen():
            cols = [c for c in (columns or schema.names) if c in schema.names]
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                    yield batch.to_pylist()
            except _READ_ERRORS as e:
                raise _read_error(path, e) from None
            finally:
                if not isinstance(src, str):
                    src.close()

        return schema, gen()
    if fmt in ("csv", "tsv"):
        delim = "," if fmt == "csv" else "\t"
        try:
            with _open_text(path) as f:
                header = next(csv.reader(f, delimiter=delim), None)
        except _READ_ERRORS as e:
            raise _read_error(path, e) from None
        if not header:
            raise UserError(f"{fs.public(path)}: empty {fmt} file (no header row)")
        schema = pa.schema([(h, pa.string()) for h in header])  # everything as text: uids, ids stay exact
        try:
            reader = pacsv.open_csv(
                _input_stream(path),
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                parse_options=pacsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={h: pa.string() for h in header}, strings_can_be_null=True,
                    include_columns=[c for c in (columns or header) if c in header],
                ),
            )
        except _READ_ERRORS as e:
            raise _read_error(path, e) from None

        def gen():
            last = None
            try:
                for batch in reader:
                    if last is not None:
                        yield last
                    last = batch.to_pylist()
            except _READ_ERRORS as e:
                raise _read_error(path, e) from None
            if last:
                # A quote that never closes swallows every following row into one value, which
                # then ends the file: check the last row before handing it over.
                tail = last[-1]
                if any(isinstance(v, str) and "\n" in v and v.endswith("\n") for v in tail.values()):
                    line = _unclosed_quote_line(path, delim)
                    if line is not None:
                        raise UserError(f"{fs.public(path)}:{line}: a quote opened here is never closed, so the rest "
                                        "of the file would be read as one value; fix the quoting")
                yield last

        return schema, gen()
    # jsonl: one object per line; line numbers in errors. Objects may omit keys, so the
    # schema is the union of the keys of the first rows.
    head = [obj for _, obj in zip(range(1000), _json_objects(path))]
    keys = list(dict.fromkeys(k for obj in head for k in obj))
    try:
        schema = pa.Table.from_pydict({k: [obj.get(k) for obj in head] for k in keys}).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep the names, read as text
        schema = pa.schema([(k, pa.string()) for k in keys])

    def gen():
        batch: list[dict[str, Any]] = []
        for obj in _json_objects(path):
            batch.append(obj)
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
        if batch:
            yield batch

    return schema, gen()


def _json_objects(path: str) -> Iterator[dict[str, Any]]:
    """Objects of a JSON-lines file; errors name the file and line."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{fs.public(path)}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{fs.public(path)}:{lineno}: expected a JSON object per line")
                yield obj
    except _READ_ERRORS as e:
        raise _read_error(f"{path}:{lineno + 1}", e) from None


def _check_url(url: Any) -> tuple[str | None, str | None]:
    if url is None or (isinstance(url, str) and not url.strip()):
        return None, "empty url"
    url = str(url).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return url, f"invalid url {url[:200]!r}: only http(s) URLs are fetched"
    return url, None


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _to_int(value: Any) -> tuple[int | None, str | None]:
    if value is None or value == "":
        return None, None
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        return None, f"id {str(value)[:40]!r} is not an integer"
    if not _INT64[0] <= v <= _INT64[1]:
        return None, f"id {str(value)[:40]!r} does not fit in 64 bits"
    return v, None


@register_source("table")
class TableSource:
    """Rows of URL tables become items of kind ``url``."""

    def __init__(self, path: str, options: SourceOptions):
        self.path = path
        self.options = options
        self.files = _table_files(path)
        schema, _ = _batches(self.files[0])
        names = set(schema.names)
        o = options
        if o.url_col not in names:
            raise UserError(
                f"{fs.public(self.files[0])}: no column {o.url_col!r} (columns: {', '.join(schema.names) or 'none'}); "
                "name the URL column with --url-col"
            )
        if o.caption_col is not None:
            if o.caption_col not in names:
                raise UserError(f"{fs.public(self.files[0])}: no caption column {o.caption_col!r} (--caption-col)")
            self.caption_col = o.caption_col
        else:
            self.caption_col = "caption" if "caption" in names else ("text" if "text" in names else None)
        self.uid_col = o.uid_col if o.uid_col in names else None
        self.id_col = o.id_col if o.id_col in names else None
        check_keep_cols(o.keep_cols, schema.names, fs.public(self.files[0]))
        self.extra_fields = [schema.field(c) for c in o.keep_cols]
        self._columns = [c for c in (o.url_col, self.caption_col, self.uid_col, self.id_col, *o.keep_cols) if c]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "table",
            **describe_location(self.path, self.files),
            "files": len(self.files),
            "columns": {"url": self.options.url_col, "caption": self.caption_col, "uid": self.uid_col, "id": self.id_col},
            "keep_cols": list(self.options.keep_cols),
        }

    def known_length(self) -> int | None:
        """The number of rows, when the footers of parquet files say it; None for
        CSV/TSV/JSONL (known only once read)."""
        if not all(_name(f).endswith(".parquet") for f in self.files):
            return None
        total = 0
        for f in self.files:
            src = fs.readable(f)
            try:
                total += pq.read_metadata(src).num_rows
            finally:
                if not isinstance(src, str):
                    src.close()
        return total

    def items(self) -> Iterator[Item]:
        index = 0
        o = self.options
        for path in self.files:
            schema, batches = _batches(path, self._columns)
            if o.url_col not in schema.names:
                raise UserError(f"{fs.public(path)}: no column {o.url_col!r} (columns: {', '.join(schema.names)})")
            for rows in batches:
                for row in rows:
                    url, err = _check_url(row.get(o.url_col))
                    uid, uid_err = normalize_uid(row.get(self.uid_col)) if self.uid_col else (None, None)
                    id_, id_err = _to_int(row.get(self.id_col)) if self.id_col else (None, None)
                    caption = row.get(self.caption_col) if self.caption_col else None
                    yield Item(
                        index=index,
                        kind=KIND_URL,
                        source=url or "",
                        url=url,
                        uid=uid or (derive_uid(url) if url else None),
                        id=id_,
                        caption=None if caption is None else str(caption),
                        extra={c: row.get(c) for c in o.keep_cols} or None,
                        error=err or uid_err or id_err,
                    )
                    index += 1


# ---------------------------------------------------------------------------------------
# image bytes embedded in a parquet column (img2dataset's ``parquet`` output)

#: a row group whose image column holds more than this (uncompressed) is refused: a cell is
#: read by decoding its whole row group (img2dataset writes 100 rows per group)
EMBEDDED_GROUP_MAX = 512 << 20
#: decoded row groups kept per process, at most this many bytes (the newest is always kept)
_CELL_CACHE_BYTES = 256 << 20
_cells: OrderedDict[tuple, pa.ChunkedArray] = OrderedDict()
_footers: OrderedDict[tuple, tuple[list[int], pq.FileMetaData]] = OrderedDict()
#: loads under way, by cache key: a second reader of the same key waits for the first
_loading: dict[tuple, Future] = {}
#: guards the caches and ``_loading`` only; never held while a file is read
_cells_lock = threading.Lock()


def embedded_group_problem(path: str, column: str, metadata: pq.FileMetaData) -> str | None:
    """Why the image cells of ``column`` cannot be read one by one (a row group too large
    to decode whole), or None."""
    if metadata.num_row_groups == 0:
        return None
    first = metadata.row_group(0)
    leaves = [i for i in range(first.num_columns) if first.column(i).path_in_schema == column]
    if not leaves:
        return f"{fs.public(path)}: no column {column!r}"
    for rg in range(metadata.num_row_groups):
        size = metadata.row_group(rg).column(leaves[0]).total_uncompressed_size
        if size > EMBEDDED_GROUP_MAX:
            return (f"{fs.public(path)}: row group {rg} holds {size >> 20} MiB of {column!r} image bytes (at most "
                    f"{EMBEDDED_GROUP_MAX >> 20} MiB); rewrite it with smaller row groups (row_group_size)")
    return None


def with_file(path: str, fn: Callable[[Any], Any]) -> Any:
    """``fn(source)`` over a local path, or over a remote file whose every read is one ranged
    request (pyarrow reads a footer, then a row group's column chunk: a few requests).

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.parquet"); pq.write_table(pa.table({"a": [1, 2]}), p)
        >>> with_file(p, pq.read_metadata).num_rows
        2
    """
    if not fs.is_remote(path):
        return fn(path)
    with fs.open_input(path, read_ahead=0) as f:
        return fn(f)


def _trim_footers() -> None:
    while len(_footers) > 64:
        _footers.popitem(last=False)


def _trim_cells() -> None:
    total = sum(c.nbytes for c in _cells.values())
    while len(_cells) > 1 and total > _CELL_CACHE_BYTES:
        total -= _cells.popitem(last=False)[1].nbytes


def _cached(cache: OrderedDict, key: tuple, load: Callable[[], Any], trim: Callable[[], None]) -> Any:
    """``cache[key]``, loaded by ``load()`` on a miss. The lock covers only the bookkeeping:
    the load runs unlocked, so readers of other files and row groups go on meanwhile, and
    readers of the same key wait for the one load under way (one decode per row group)."""
    with _cells_lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        pending = _loading.get(key)
        owner = pending is None
        if owner:
            pending = _loading[key] = Future()
    if not owner:
        return pending.result()  # the loader's value, or its exception raised here too
    try:
        value = load()
    except BaseException as e:
        with _cells_lock:
            del _loading[key]
        pending.set_exception(e)
        raise
    with _cells_lock:
        cache[key] = value
        trim()
        del _loading[key]
    pending.set_result(value)
    return value


def read_cell(path: str, row: int, column: str, max_bytes: int | None = None) -> bytes:
    """The bytes in ``column`` of row ``row`` (0-based, over the whole file) of a parquet file.

    Its row group is decoded once and kept in a small per-process cache, so the rows of a
    group, read in order by a shard's threads, cost one decode. Raises OSError for a null
    cell, a row past the end, a value over ``max_bytes`` (checked before it is copied) and
    a file that cannot be read. A remote file is read where it lies: its footer once, then
    only the image column of the row group a cell is in (ranged reads).
    """
    try:
        if fs.is_remote(path):
            i = fs.info(path, fresh=False)
            fkey = (path, i["version"], i["size"])
        else:
            st = os.stat(path)
            fkey = (path, st.st_mtime_ns, st.st_size)

        def read_footer() -> tuple[list[int], pq.FileMetaData]:
            md = with_file(path, pq.read_metadata)
            starts = [0]
            for rg in range(md.num_row_groups):
                starts.append(starts[-1] + md.row_group(rg).num_rows)
            return starts, md

        starts, md = _cached(_footers, ("footer", *fkey), read_footer, _trim_footers)
        if not 0 <= row < starts[-1]:
            raise OSError(f"row {row} is past the end of {fs.public(path)} ({starts[-1]} rows)")
        rg = bisect.bisect_right(starts, row) - 1

        def read_group() -> pa.ChunkedArray:
            problem = embedded_group_problem(path, column, md)
            if problem:
                raise OSError(problem)
            return with_file(
                path, lambda f: pq.ParquetFile(f, metadata=md).read_row_group(rg, columns=[column]).column(0))

        cells = _cached(_cells, ("cells", *fkey, rg, column), read_group, _trim_cells)
    except (pa.ArrowException, KeyError, IndexError) as e:
        raise OSError(f"{fs.public(path)}: cannot read column {column!r}: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    value = cells[row - starts[rg]]
    if not value.is_valid:
        raise OSError(f"no image bytes: column {column!r} of row {row} is null")
    buf = value.as_buffer()
    if max_bytes is not None and buf.size > max_bytes:
        raise OSError(f"embedded image of {buf.size} bytes exceeds the byte cap of {max_bytes} (--max-bytes)")
    return buf.to_pybytes()
