"""Nothing machine-specific in what a pipeline writes (issue 17): every stage run end to end
by ``silverlabel build`` on a small folder of photos, then every file it wrote -- manifests,
build state, tar members, parquet values and metadata, checkpoints, JSON reports, the card --
is scanned for the absolute folder it ran in, the home folder and the user name. A second
run in another folder writes the same manifests (less their ``updated`` time), the same
selection rows and the same sample JSON, byte for byte: datasets are named by their ids."""

from __future__ import annotations

import getpass
import io
import json
import os
import shutil
import socket
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from silverlabel import pipeline
from silverlabel.dataset import dataset_identity, input_name, is_identity
from silverlabel.demodata import photo_like_images

RECIPE = """\
description: every stage, small
vars:
  photos: photos
steps:
  pool:
    stage: ingest
    sources: ["${vars.photos}"]
    output: pool
    samples_per_shard: 8
    workers: 1
  labels:
    stage: label
    dataset: ${pool}
    device: cpu
    workers: 1
    decode_threads: 1
  sel:
    stage: select
    source: ${labels}
    output: sel
    label: source
    val_per_class: 1
    keys_file: keys.txt
    dedupe: exact
    threads: 1
  trainset:
    stage: shard
    selection: ${sel}
    output: trainset
    shards: 2
    name: toy
    workers: 1
  rnf:
    stage: reinforce
    trainset: ${trainset}
    output: rnf
    augs: 1
    topk: 3
    device: cpu
    workers: 1
    threads: 1
  pre:
    stage: train
    trainset: ${trainset}
    output: runs/pre
    model: test_vit
    img_size: 32
    batch_size: 4
    steps: 2
    log_every: 1
  ft:
    stage: train
    trainset: ${trainset}
    output: runs/ft
    init: ${pre}/checkpoint-final.pt
    model: test_vit
    img_size: 32
    batch_size: 4
    steps: 1
  eval:
    stage: eval
    run: ${ft}
    trainset: ${trainset}
  lowshot:
    stage: lowshot
    run: ${pre}
    trainset: ${trainset}
    fractions: [0.5]
    modes: [probe, finetune]
    ft_steps: 1
    batch_size: 8
  card:
    stage: card
    dataset: ${trainset}
    html: report
"""


def _write_photos(folder: Path) -> None:
    for i, (name, data) in enumerate(photo_like_images(18, size=(64, 48), seed=11)):
        d = folder / ("cat", "dog", "fox")[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)


def _build(where: Path, only: list[str] | None = None) -> pipeline.Recipe:
    _write_photos(where / "photos")
    (where / "keys.txt").write_text("".join(f"{i:09d}\n" for i in range(18)))  # every sample: a rule named by digest
    (where / "recipe.yaml").write_text(RECIPE)
    recipe = pipeline.load_recipe(where / "recipe.yaml", out=str(where / "out"))
    pipeline.build(recipe, only=only or (), log=lambda m: None)
    return recipe


def _needles(where: Path) -> dict[str, bytes]:
    """What no file may hold: the folder the run used (as given and resolved), the home
    folder, the user name as a path component, the host name."""
    out = {"run folder": str(where).encode(), "run folder (resolved)": str(where.resolve()).encode()}
    home = os.path.expanduser("~")
    if len(home) > 1:
        out["home"] = home.encode()
    user = getpass.getuser()
    out["user name"] = f"/{user}/".encode()
    out["user name (tmp)"] = f"-of-{user}".encode()  # pytest's /tmp/pytest-of-USER
    host = socket.gethostname()
    if len(host) >= 6:  # a short host name could match by chance in binary data
        out["host name"] = host.encode()
    return out


def _texts(path: Path) -> list[tuple[str, bytes]]:
    """(what, bytes) to scan for one file: its bytes; a tar's members (and their header
    fields); a parquet file's values and key-value metadata; a checkpoint's non-tensor values."""
    data = path.read_bytes()
    out = [("bytes", data)]
    if path.suffix == ".tar":
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf.getmembers():
                out.append((f"member {m.name} header", f"{m.name}\0{m.uname}\0{m.gname}\0{m.linkname}".encode()))
                if m.isfile():
                    out.append((f"member {m.name}", tf.extractfile(m).read()))
    elif path.suffix == ".parquet":
        pf = pq.ParquetFile(io.BytesIO(data))
        meta = pf.schema_arrow.metadata or {}
        out.append(("parquet metadata", b"\0".join(k + b"=" + v for k, v in meta.items())))
        out.append(("parquet values", json.dumps(pf.read().to_pylist(), default=str).encode()))
    elif path.suffix == ".pt":
        import torch

        ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

        def plain(v):
            if isinstance(v, torch.Tensor):
                return None
            if isinstance(v, dict):
                return {str(k): plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        out.append(("checkpoint values", json.dumps(plain(ck), default=str).encode()))
    return out


def _scan(where: Path) -> tuple[int, list[str]]:
    needles = _needles(where)
    found, files = [], 0
    for dirpath, _dirs, names in os.walk(where / "out"):
        for name in names:
            path = Path(dirpath) / name
            files += 1
            rel = path.relative_to(where)
            for label, needle in needles.items():
                if needle in str(rel).encode():
                    found.append(f"{rel}: its name holds the {label}")
            for what, data in _texts(path):
                for label, needle in needles.items():
                    if needle in data:
                        found.append(f"{rel} ({what}): holds the {label} {needle.decode()!r}")
    return files, found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a = tmp_path_factory.mktemp("here") / "deeper"
    a.mkdir()
    return a, _build(a)


def test_every_file_is_free_of_the_paths_it_ran_in(built):
    where, recipe = built
    files, found = _scan(where)
    assert files > 40  # every stage wrote: manifests, tars, tables, checkpoints, reports, the card
    assert not found, "\n".join(found)
    # the ids are there instead, and say which dataset is which
    out = where / "out"
    pool, sel, ts = (json.loads((out / d / "silverlabel.json").read_text()) for d in ("pool", "sel", "trainset"))
    assert is_identity(pool["id"]) and pool["id"].startswith("pool@") and dataset_identity(out / "pool") == pool["id"]
    assert sel["parents"] == [{"kind": "dataset", "id": pool["id"], "location": "../pool", "labels": "efficientnet_lite0"}]
    assert sel["config"]["source"] == pool["id"] and ts["config"]["selection"] == sel["id"]
    assert sel["config"]["keys_file"] == input_name(where / "keys.txt")
    assert ts["parents"][0]["location"] == "../sel" and ts["parents"][0]["source_datasets"] == [pool["id"]]
    assert pool["config"]["sources"] == [input_name(where / "photos")]
    assert pool["config"]["sources"][0].startswith("photos@sha256:")
    sample = json.loads(_member(out / "trainset" / "toy-train-0000.tar", ".json"))
    assert sample["source"]["dataset"] == pool["id"]
    ck = _load(out / "runs" / "ft" / "checkpoint-final.pt")
    assert ck["config"]["trainset"] == ts["id"] and "output" not in ck["config"]
    assert ck["config"]["init"] == input_name(out / "runs" / "pre" / "checkpoint-final.pt")  # the weights, by digest
    assert is_identity(ck["id"]) and ck["id"].startswith("run@")
    ev = json.loads((out / "runs" / "ft" / "eval-validation.json").read_text())
    assert ev["run"] == ck["id"] and ev["trainset"] == ts["id"]
    rnf = json.loads((out / "rnf" / "silverlabel.json").read_text())
    assert rnf["parents"][0]["id"] == ts["id"] and rnf["id"] != ts["id"]


def test_build_still_finds_what_changed(built):
    """The build state names inputs relative to the recipe, and a changed input is still seen."""
    where, recipe = built
    assert all(p.action == "skip" for p in pipeline.plan(recipe))
    state = json.loads((where / "out" / "sel" / ".build-sel.json").read_text())
    assert list(state["inputs"]) == ["source:${out}/pool", "keys_file:keys.txt"]
    keys = where / "keys.txt"
    text = keys.read_text()
    keys.write_text(text + "\n")  # another input: sel and what reads it rerun
    try:
        plan = {p.step.name: p.reason for p in pipeline.plan(recipe)}
    finally:
        keys.write_text(text)
    assert plan["sel"] == "input changed (keys_file)" and plan["trainset"] == "input changed (sel reruns)"
    assert plan["pool"] == plan["labels"] == "up to date"


def test_a_build_moved_whole_is_up_to_date(built, tmp_path):
    where, _ = built
    moved = tmp_path / "moved"
    shutil.copytree(where, moved)  # recipe, photos and outputs (copy2 keeps the times)
    recipe = pipeline.load_recipe(moved / "recipe.yaml", out=str(moved / "out"))
    assert {p.step.name: p.reason for p in pipeline.plan(recipe)} == {s.name: "up to date" for s in recipe.steps}
    shutil.rmtree(moved)


def test_a_second_run_elsewhere_writes_the_same_bytes(built, tmp_path):
    where, _ = built
    other = tmp_path / "elsewhere"
    other.mkdir()
    _build(other, only=["pool", "labels", "sel", "trainset"])
    a, b = where / "out", other / "out"
    for d in ("pool", "sel", "trainset"):
        ma, mb = (json.loads((x / d / "silverlabel.json").read_text()) for x in (a, b))
        ma.pop("updated"), mb.pop("updated")  # the one field that says when
        assert ma == mb, d
    for p in sorted((a / "sel" / "selection").glob("*.parquet")):
        assert p.read_bytes() == (b / "sel" / "selection" / p.name).read_bytes()
    for p in sorted((a / "trainset").glob("*.tar")):
        assert p.read_bytes() == (b / "trainset" / p.name).read_bytes(), p.name
    for p in sorted((a / "pool" / "labels" / "efficientnet_lite0").glob("*.parquet")):
        ta = pq.ParquetFile(p).schema_arrow.metadata[b"silverlabel.label_config"]
        assert ta == pq.ParquetFile(b / "pool" / "labels" / "efficientnet_lite0" / p.name).schema_arrow.metadata[
            b"silverlabel.label_config"]
    shutil.rmtree(other)


def _member(tar: Path, ext: str) -> bytes:
    with tarfile.open(tar) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(ext))
        return tf.extractfile(m).read()


def _load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_large_input_is_named_by_its_size_head_and_tail(tmp_path, monkeypatch):
    """Naming a local input reads a file over the limit only at its ends (a terabyte of input
    tars is not read once more per run), and a change there, or of its size, renames it."""
    from silverlabel import dataset

    monkeypatch.setattr(dataset, "NAME_FULL_LIMIT", 64)
    monkeypatch.setattr(dataset, "NAME_SAMPLE", 16)
    f = tmp_path / "big.tar"
    f.write_bytes(bytes(range(200)))
    name = dataset.input_name(f)
    assert name.startswith("big.tar@sha256:")
    f.write_bytes(bytes(range(100)) + b"\x00" + bytes(range(101, 200)))  # the middle: not read
    assert dataset.input_name(f) == name
    f.write_bytes(b"\x01" + bytes(range(1, 200)))  # the head
    assert dataset.input_name(f) != name
    f.write_bytes(bytes(range(200)) + b"x")  # the size
    assert dataset.input_name(f) != name


def test_a_folder_is_named_by_its_files_names_and_sizes_without_reading_them(tmp_path, monkeypatch):
    """Naming a local folder of images lists it and stats each file, reading no byte of any
    (an ingest of a million images does not read them once more to name them); the name
    changes when a file is added, removed, renamed or resized, and stays for a copy made
    elsewhere with new modification times (it is published). The price, as documented: a
    same-size rewrite keeps the name."""
    from silverlabel import dataset

    photos = tmp_path / "a" / "photos"
    _write_photos(photos)
    name = dataset.input_name(photos)
    assert name.startswith("photos@sha256:")

    def no_reads(*a, **k):
        raise AssertionError("a folder's name read a file's bytes")

    with monkeypatch.context() as m:
        m.setattr(dataset, "name_digest", no_reads)
        m.setattr(dataset, "file_digest", no_reads)
        m.setattr(dataset, "open_read", no_reads)
        assert dataset.input_name(photos) == name

    copy = tmp_path / "b" / "photos"
    shutil.copytree(photos, copy, copy_function=shutil.copy)  # new modification times
    one = next(iter(sorted(copy.rglob("*.jpg"))))
    os.utime(one, (1, 1))
    assert one.stat().st_mtime_ns != (photos / one.relative_to(copy)).stat().st_mtime_ns
    assert dataset.input_name(copy) == name

    data = one.read_bytes()
    one.write_bytes(bytes(b ^ 0xFF for b in data))  # other bytes, the same size: the name stays
    assert dataset.input_name(copy) == name
    one.write_bytes(data + b"\0")  # resized
    assert dataset.input_name(copy) != name
    one.write_bytes(data)
    (copy / "cat" / "extra.jpg").write_bytes(b"x")  # added
    assert dataset.input_name(copy) != name
    (copy / "cat" / "extra.jpg").unlink()
    assert dataset.input_name(copy) == name
    one.rename(one.with_name("renamed.jpg"))  # renamed
    assert dataset.input_name(copy) != name
    one.with_name("renamed.jpg").rename(one)
    one.unlink()  # removed
    assert dataset.input_name(copy) != name
    # a file is still named by its bytes
    f = tmp_path / "keys.txt"
    f.write_text("a\n")
    first = dataset.input_name(f)
    f.write_text("b\n")
    assert dataset.input_name(f) != first
