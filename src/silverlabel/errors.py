"""The one error type a user sees as a single line.

``UserError`` is raised for bad input: a missing file, a wrong flag, a dataset of the wrong
kind, a changed setting on resume. The CLI prints it as one line naming the file, row or
flag and exits with 2. Anything else is a bug or an environment failure and keeps its
traceback (``SILVERLABEL_DEBUG=1`` shows the traceback of a ``UserError`` too).

It subclasses ``ValueError`` so code and tests that catch ``ValueError`` keep working.

    >>> try:
    ...     raise UserError("data/pool: not a silverlabel dataset")
    ... except ValueError as e:
    ...     print(e)
    data/pool: not a silverlabel dataset
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, explained in one line (exit code 2 at the CLI)."""
