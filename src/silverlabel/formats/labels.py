"""A labels set's class map: ``POOL/labels/{teacher}/_classes.json``, beside its tables.

The tables (``label``'s output, COYO-Labeled-300M's schema plus ``key``) hold class
indices; the class map turns them into wnids and names without silverlabel::

    {"label_space": "in21k", "num_classes": 21841,
     "classes": [{"cls": 0, "wnid": "n00004475", "name": "organism"}, ...]}

the shape of a selection's ``classes.json``, over the whole label space. The leading ``_``
keeps the folder one parquet dataset: pyarrow, pandas and Spark skip ``_``- and ``.``-files
when they read a folder (``pq.read_table(folder)`` fails on any other file). It is recorded
like the tables, in ``.done/classes.json`` (:class:`silverlabel.stage.Commit`), so
``silverlabel verify`` checks it.

    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     doc = json.loads(write_classes(d, "in1k").read_text())
    >>> doc["num_classes"], doc["classes"][285]
    (1000, {'cls': 285, 'wnid': 'n02124075', 'name': 'Egyptian cat'})
"""

from __future__ import annotations

import os
from pathlib import Path

#: the class map's file name in a labels folder
CLASSES_FILE = "_classes.json"
#: the unit name of its commit record (``.done/classes.json``)
CLASSES_UNIT = "classes"


def write_classes(folder: str | os.PathLike, label_space: str) -> Path:
    """Write ``folder/_classes.json`` for ``label_space`` (atomically) and its commit record;
    returns its path."""
    from silverlabel.dataset import Dataset, write_json_atomic
    from silverlabel.stage import Commit
    from silverlabel.teachers.labelspace import get_label_space

    space = get_label_space(label_space)
    path = Path(folder) / CLASSES_FILE
    names = space.names
    write_json_atomic(path, {"label_space": space.name, "num_classes": len(space),
                             "classes": [{"cls": i, "wnid": w, "name": names[i]} for i, w in enumerate(space.wnids)]})
    Commit(str(Dataset(folder).commit_path(CLASSES_UNIT)), {"label_space": space.name}).write([path])
    return path
