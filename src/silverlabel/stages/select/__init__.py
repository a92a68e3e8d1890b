"""``silverlabel select``: classes, splits, subsets, uid lists and de-duplication.

Input is a silverlabel dataset (samples + labels), a bare labels table in the
COYO-Labeled-300M schema (no images), or a bare samples/metadata table with a ``uid``
column (DataComp metadata). The rules, in order: uid list (``--uids``) -> exact /
near-duplicate removal (``--dedupe``, ``--exclude-near``) -> label rule (``--label
top1|source``, label-space remapping, WordNet roll-up) -> ``--min-prob`` -> class filter
(``--val-per-class``, ``--min-train-per-class``, ``--top-classes``) -> validation draw ->
``--fraction --balanced`` subset of train -> ``--keys-file``. All random draws are
functions of (``--seed``, key) through md5, so the same input and seed give the same
selection, on every engine.

The rules are written once, as DuckDB SQL run on a unit of parquet files
(:mod:`.units`); DuckDB runs in-process, so a unit runs on the driver (``--engine local``:
the whole pool is one unit) or in a Ray task (``--engine ray``: one unit per shard). The
rules that need the whole pool run on the driver: the pool-wide ones (uid list, duplicate
search, reading a bare table; :mod:`.pool`) produce key tables for the units, and the class
choice, validation draw and quotas are decided from small per-unit summaries
(:mod:`.run`). A 300M-row pool never comes into Python: only its keys and 64-bit pHashes
do, when near-duplicates are searched. Each unit's DuckDB holds at most ``--memory-limit``
(on Ray: each task's) and spills beyond it into the output's temporary folder.

    >>> balanced_quotas({"a": 500, "b": 500, "c": 500}, total=7, seed=0)
    {'a': 2, 'b': 2, 'c': 3}
"""

from __future__ import annotations

from .config import SelectConfig, SelectSummary
from .pool import DUPLICATES_FILE
from .rules import balanced_quotas, choose_classes, load_uids, uids_to_npy, write_classes_and_report
from .run import run_select
from .units import ROWS_PER_PART

__all__ = ["DUPLICATES_FILE", "ROWS_PER_PART", "SelectConfig", "SelectSummary", "balanced_quotas", "choose_classes",
           "load_uids", "run_select", "uids_to_npy", "write_classes_and_report"]
