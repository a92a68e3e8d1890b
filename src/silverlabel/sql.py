"""SQL text from data, safely: the one place that quotes for DuckDB.

Never paste a path, a name or a value into SQL by string formatting. Values go in as bound
parameters (``con.execute(sql, [value])``) wherever DuckDB accepts them; where it does not
(table functions' file arguments in some positions, ``COPY ... TO``, ``SET``), use
:func:`literal` for a string literal and :func:`ident` for an identifier.

    >>> literal("out/bob's pool/*.parquet")
    "'out/bob''s pool/*.parquet'"
    >>> ident('labels"; DROP TABLE x; --')
    '"labels""; DROP TABLE x; --"'
    >>> read_parquet(["a.parquet", "b's.parquet"])
    "read_parquet(['a.parquet', 'b''s.parquet'])"
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from silverlabel.errors import UserError


def literal(value: str | os.PathLike) -> str:
    """A SQL string literal: single quotes doubled, NUL refused."""
    s = os.fspath(value)
    if "\x00" in s:
        raise UserError(f"a NUL byte cannot appear in a SQL string: {s!r}")
    return "'" + s.replace("'", "''") + "'"


def ident(name: str) -> str:
    """A SQL identifier: double quotes doubled, NUL refused."""
    if "\x00" in name:
        raise UserError(f"a NUL byte cannot appear in a SQL identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def read_parquet(paths: str | os.PathLike | Sequence[str | os.PathLike], **options: bool) -> str:
    """``read_parquet([...])`` over quoted paths or globs; options are boolean flags only."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items = ", ".join(literal(p) for p in paths)
    opts = "".join(f", {k}={'true' if v else 'false'}" for k, v in options.items() if k.isidentifier())
    return f"read_parquet([{items}]{opts})"
