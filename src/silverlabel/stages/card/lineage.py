"""What a dataset directory is, and the pool / selection / training set above it that still exist.

``resolve_lineage`` reads manifests only (no tables). It accepts an ingest, select or shard output
and follows the ``parents`` recorded in the manifests upwards (each found at its location
relative to the child, :func:`silverlabel.dataset.parent_location`, and named by its id); a
parent that is gone, or there but another dataset than the one recorded, becomes a note in the
card instead of an error. Notes name parents by id and relative location, never by a path of
this machine.

A dataset at a URL (issue 16) and the parents found in its store are mirrored into this
process's staging folder (:func:`mirror_tables`: manifests, JSON and parquet tables, the
card's own files; never a tar, whose few samples the card reads by range), so the card's
DuckDB views and file checks work on local files; what the card writes there is uploaded
(:func:`silverlabel.dataset.atomic_write`).

A labels name read from a manifest is checked with :func:`silverlabel.dataset.check_name`
before it becomes a path component.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silverlabel.dataset import (MANIFEST, Dataset, Pool, Selection, check_name, dataset_identity, display, fetch_local,
                                 map_ordered, parent_location, url_of)
from silverlabel.errors import UserError


@dataclass
class Lineage:
    """The dataset and the directories above it that still exist."""

    root: Path
    kind: str  # pool | selection | trainset
    manifest: dict[str, Any]
    pool: Path | None = None
    pool_manifest: dict[str, Any] | None = None
    selection: Path | None = None
    selection_manifest: dict[str, Any] | None = None
    trainset: Path | None = None
    trainset_manifest: dict[str, Any] | None = None
    labels_name: str | None = None  # checked by check_labels_name: safe as one path component
    notes: list[str] = field(default_factory=list)

    def chain(self) -> list[tuple[str, Path, dict[str, Any]]]:
        """(stage, directory, manifest) from the pool down, for the directories that exist."""
        out = []
        for stage, p, m in (("ingest", self.pool, self.pool_manifest),
                            ("select", self.selection, self.selection_manifest),
                            ("shard", self.trainset, self.trainset_manifest)):
            if p is not None and m is not None:
                out.append((stage, p, m))
        return out

    @property
    def labels_dir(self) -> Path | None:
        """The pool's ``labels/NAME`` folder of the labels this card describes."""
        if self.pool is None or not self.labels_name:
            return None
        return Pool(self.pool).labels_dir(self.labels_name)


def _manifest(path: Path) -> dict[str, Any] | None:
    try:
        return Dataset(path).read_manifest()
    except (FileNotFoundError, ValueError):
        return None


def resolve_lineage(dataset: str | os.PathLike) -> Lineage:
    """Find what ``dataset`` is and the pool / selection / training set it comes from.

    >>> resolve_lineage("data/pool").kind  # doctest: +SKIP
    'pool'
    """
    root = mirror_tables(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"{display(dataset)}: no such dataset directory")
    man = _manifest(root)
    has_info = (root / "_info.json").is_file()
    if man is None and not has_info:
        raise UserError(f"{root}: not a silverlabel dataset (no {MANIFEST} or _info.json)")
    man = man or {"stage": "shard"}
    stage = man.get("stage")
    if stage == "shard" or has_info:
        if not has_info:
            raise UserError(f"{root}: training set is not finished (no _info.json); run silverlabel shard again")
        lin = Lineage(root, "trainset", man, trainset=root, trainset_manifest=man)
        _find_selection(lin)
    elif stage == "select":
        lin = Lineage(root, "selection", man, selection=root, selection_manifest=man)
    elif stage == "ingest":
        lin = Lineage(root, "pool", man, pool=root, pool_manifest=man)
    else:
        raise UserError(f"{root}: card reads an ingest, select or shard output, this one is {stage!r}")
    if lin.selection_manifest is not None and lin.pool is None:
        _find_pool(lin)
    for parent in (lin.selection, lin.pool):
        if parent is not None and parent != root:
            mirror_tables(parent)
    if lin.pool_manifest is not None:
        labels = lin.pool_manifest.get("labels") or {}
        want = (lin.selection_manifest or {}).get("config", {}).get("labels_name")
        name = want if want in labels else (sorted(labels)[0] if labels else None)
        lin.labels_name = None if name is None else check_name(name, "labels name read from a manifest")
    return lin


#: what :func:`mirror_tables` leaves in the store: image tars (read by range where needed)
_NOT_MIRRORED = (".tar",)


def mirror_tables(dataset: str | os.PathLike) -> Path:
    """The local folder to read ``dataset`` from: the folder itself, or for a URL (or a
    staging path naming one) its staging mirror, into which every file under the prefix but
    the tars and hidden files (commit records, temporaries) is fetched
    (:func:`silverlabel.dataset.fetch_local`: again only when the object changed), 16 at a
    time. A prefix with nothing in it leaves no folder (no such dataset)."""
    from silverlabel import fs
    from silverlabel.dataset import stage_path

    u = url_of(dataset)
    if u is None:
        return Path(dataset)
    fs.forget_one(u)
    try:
        rels = fs.walk_files(u)
    except (FileNotFoundError, NotADirectoryError):
        rels = []
    wanted = [r for r in rels if not r.endswith(_NOT_MIRRORED) and not any(p.startswith(".") for p in r.split("/"))]
    for _ in map_ordered(fetch_local, [f"{u}/{r}" for r in wanted], threads=16):
        pass
    return stage_path(u)


def _find_selection(lin: Lineage) -> None:
    """The selection a training set was sharded from, if it still exists."""
    parent = next((p for p in lin.manifest.get("parents", []) if p.get("kind") == "selection"), None)
    if not parent:
        return
    sel = parent_location(lin.root, parent)
    shown = _shown(parent)
    sm = _manifest(sel) if sel is not None else None
    if sm is None or sm.get("stage") != "select":
        lin.notes.append(f"selection {shown} not found: per-sample facts read from the shards")
        return
    lin.selection, lin.selection_manifest = sel, sm
    recorded = lin.manifest.get("selection_sha256")
    try:
        changed = recorded is not None and recorded != Selection(sel).fingerprint()
    except (UserError, OSError) as e:
        lin.notes.append(f"selection {shown} could not be compared with these shards ({_no_root(e, sel)})")
        return
    if changed:
        lin.notes.append(f"selection {shown} changed after these shards were written: its rows and "
                         "report may not describe this training set")


def _find_pool(lin: Lineage) -> None:
    """The ingested pool a selection was made from, if it still exists."""
    parent = (lin.selection_manifest.get("parents") or [{}])[0]
    if parent.get("kind") != "dataset":
        return
    where = parent_location(lin.selection, parent)
    pm = _manifest(where) if where is not None else None
    if pm is None or pm.get("stage") != "ingest":
        lin.notes.append(f"source dataset {_shown(parent)} not found: no ingest statistics")
    elif parent.get("id") and (now := dataset_identity(where)) != parent["id"]:
        lin.notes.append(f"source dataset {_shown(parent)} is now another dataset ({now}): no ingest statistics")
    else:
        lin.pool, lin.pool_manifest = where, pm


def _shown(parent: dict[str, Any]) -> str:
    """A parent as a note names it: its id and its location relative to the child."""
    ident, where = parent.get("id"), parent.get("location")
    if ident and where:
        return f"{ident} ({where})"
    return str(ident or where or parent.get("path") or "?")


def _no_root(e: BaseException, root: Path) -> str:
    """An error's text with ``root`` (a path of this machine) left out."""
    return str(e).replace(str(root), ".")
