"""The selection directory written by ``silverlabel select`` and read by ``shard``.

::

    SELECTION/
      silverlabel.json          manifest: stage "select", config, parents (lineage), counts
      selection/part-{unit}-{j}.parquet ...   one row per selected sample (SELECTION_SCHEMA),
                                in (split, key) order within a file; how the rows are cut
                                into files depends on the engine, so readers order by key
      classes.json              the class map: cls -> wnid / name / counts
      report.json               counts per split and class, rules applied, removed duplicates
      duplicates.parquet        with --dedupe / --exclude-near: removed_key, kept_key, distance, rule

A selected sample points back at its source: ``source_dataset`` (the id of the dataset
that holds its bytes, :func:`silverlabel.dataset.dataset_identity`, or null when the
selection came from a bare table with no images; the manifest's ``parents`` give that id's
location relative to the selection; an older selection held the directory's path) and
``source_shard`` (the tar name inside that dataset's ``shards/``) + ``source_key``.
``key`` is the sample's key in the output; it differs from ``source_key`` only when a uid
is listed several times (``{source_key}-1``, ``-2``, as DataComp's resharder does).

    >>> SELECTION_SCHEMA.field("cls").type
    DataType(int32)
"""

from __future__ import annotations

import pyarrow as pa

SELECTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_key", pa.string()),
        ("id", pa.int64()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("split", pa.string()),  # "train" | "validation" (or a user's split name)
        ("cls", pa.int32()),  # index into classes.json; -1 when the selection has no labels
        ("class_name", pa.string()),
        ("labels", pa.list_(pa.int32())),  # teacher top-k (label space of the labels), if known
        ("label_probs", pa.list_(pa.float32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("imagehash", pa.string()),
        ("source_dataset", pa.string()),
        ("source_shard", pa.string()),
    ]
)

CLASSES_FILE = "classes.json"
REPORT_FILE = "report.json"
SELECTION_DIR = "selection"
