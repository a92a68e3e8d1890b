"""The label stage on the real default teacher (CPU): correctness, format, resume."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from silverlabel.demodata import ImageServer, photo_like_images
from silverlabel.stages.ingest import IngestConfig, run_ingest
from silverlabel.stages.label import LABELS_SCHEMA, LabelConfig, run_label, threshold_stats
from silverlabel.sources.http import FetchConfig
from silverlabel.teachers import TeacherSpec
from silverlabel.teachers.labelspace import get_label_space

CATS = {"n02124075", "n02123159", "n02123045"}  # Egyptian cat, tiger cat, tabby
COFFEE = {"n07920052", "n07930864"}  # espresso, cup


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("label")
    folder = root / "photos"
    folder.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(folder / "a_chelsea.jpg", quality=95)
    Image.fromarray(skimage.data.coffee()).save(folder / "b_coffee.png")
    for name, data in photo_like_images(22, size=(320, 240), seed=5):
        (folder / name).write_bytes(data)
    (folder / "c_tiny.png").write_bytes(b"")  # fails ingest: must get no label row
    run_ingest(IngestConfig(sources=(str(folder),), output=str(root / "ds"), samples_per_shard=5, workers=1))
    return root / "ds"


@pytest.fixture(scope="module")
def labeled(dataset):
    summary = run_label(LabelConfig(dataset=str(dataset), device="cpu", decode_threads=2))
    return summary, pq.read_table(Path(summary.output)).to_pylist()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def test_real_teacher_sees_a_cat_and_coffee(labeled):
    _, rows = labeled
    in21k = get_label_space("in21k")
    by_source = {r["key"]: r for r in rows}
    chelsea, coffee = by_source["000000000"], by_source["000000001"]
    assert in21k.wnids[chelsea["labels"][0]] in CATS
    assert in21k.wnids[coffee["labels"][0]] in COFFEE
    assert chelsea["label_probs"][0] > 0.3


def test_schema_is_coyo_plus_key(labeled, dataset):
    summary, rows = labeled
    files = sorted(Path(summary.output).glob("*.parquet"))
    assert [f.name for f in files] == [p.name for p in sorted((dataset / "samples").glob("*.parquet"))]
    for f in files:
        assert pq.read_schema(f).remove_metadata() == LABELS_SCHEMA
        assert pq.read_schema(f).metadata[b"silverlabel.decode"] == b"cpu"  # which decoder made the pixels
    assert len(rows) == 24  # every successful sample, not the failed one
    samples = {r["key"]: r for r in pq.read_table(dataset / "samples").to_pylist()}
    for r in rows:
        s = samples[r["key"]]
        assert (r["id"], r["url"], r["imagehash"], r["width"], r["height"]) == (
            s["id"], s["url"], s["imagehash"], s["width"], s["height"])
        assert len(r["labels"]) == len(r["label_probs"]) == 50
        p = np.asarray(r["label_probs"])
        assert np.all(np.diff(p) <= 0) and p.sum() <= 1 + 1e-5 and p.min() >= 0
        assert len(set(r["labels"])) == 50 and max(r["labels"]) < 21841


def test_deterministic_and_resumable(labeled, dataset, tmp_path):
    summary, _ = labeled
    first = _digest(Path(summary.output))
    again = run_label(LabelConfig(dataset=str(dataset), device="cpu", decode_threads=2))
    assert again.shards_done_now == 0  # all complete: nothing redone
    victim = sorted(Path(summary.output).glob("*.parquet"))[2]
    victim.unlink()
    redo = run_label(LabelConfig(dataset=str(dataset), device="cpu", decode_threads=2))
    assert redo.shards_done_now == 1
    assert _digest(Path(summary.output)) == first  # same bytes (same device and batch size)


def test_kill_and_resume_via_cli(dataset, labeled, tmp_path):
    # small batches make the run slow enough to kill; CPU kernels may round differently at
    # other batch sizes, so the reference uses the same one
    base = [sys.executable, "-m", "silverlabel.cli", "label", str(dataset), "--device", "cpu", "--batch-size", "2",
            "--no-progress", "--name"]
    subprocess.run([*base, "reference"], check=True, capture_output=True, timeout=600)
    ref = _digest(dataset / "labels" / "reference")
    out = dataset / "labels" / "killed"
    cmd = [*base, "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.parquet"))) < 1:
        time.sleep(0.01)
    running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert running, "label finished before it could be killed"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert _digest(out) == ref
    assert not [f for f in out.iterdir() if ".tmp" in f.name]


def test_limit_and_stats(dataset, labeled, capsys):
    s = run_label(LabelConfig(dataset=str(dataset), device="cpu", limit=7, output_name="peek", decode_threads=2))
    assert s.rows == 7
    stats = threshold_stats(sorted(Path(labeled[0].output).glob("*.parquet")))
    assert [r["threshold"] for r in stats] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert all(r["images"] == 24 for r in stats)
    avg = [r["avg_labels_per_image"] for r in stats]
    assert avg == sorted(avg, reverse=True) and avg[-1] <= 1.0 + 1e-9  # at most one label >= 0.5 (softmax)
    from silverlabel.cli import main

    assert main(["label", "--stats", str(dataset), "--name", "efficientnet_lite0"]) == 0
    assert "threshold" in capsys.readouterr().out


def test_timm_teacher_from_checkpoint_and_ensemble(dataset, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=1000)
    ckpt = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    spec = TeacherSpec("timm:test_efficientnet", checkpoint=str(ckpt))
    s = run_label(LabelConfig(dataset=str(dataset), device="cpu", teachers=(spec,), topk=5, label_space="in1k",
                              limit=4, decode_threads=2))
    assert s.rows == 4
    ens = run_label(LabelConfig(dataset=str(dataset), device="cpu", teachers=(TeacherSpec("efficientnet_lite0"), spec),
                                topk=5, limit=4, decode_threads=2))
    assert Path(ens.output).name == "efficientnet_lite0+test_efficientnet"
    # a pickle with code in it is refused, never executed
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, evil)
    from silverlabel.teachers import create_teacher

    with pytest.raises(ValueError, match="weights-only"):
        create_teacher(TeacherSpec("timm:test_efficientnet", checkpoint=str(evil)))


def test_default_teacher_is_the_tf_variant_and_confident():
    """The TF-padding variant with mean/std 0.5 reproduces the original model."""
    import timm
    import torch

    from silverlabel.teachers import create_teacher

    t = create_teacher(TeacherSpec("efficientnet_lite0"))
    assert t.meta["architecture"] == "tf_efficientnet_lite0" and t.data_config["mean"] == (0.5, 0.5, 0.5)
    tf = timm.data.create_transform(**t.data_config)
    with torch.no_grad():
        p = t.model(tf(Image.fromarray(skimage.data.coffee())).unsqueeze(0)).softmax(-1)[0]
    in1k = get_label_space("in1k")
    assert in1k.wnids[int(p.argmax())] == "n07920052" and float(p.max()) > 0.9  # espresso


def test_cli_errors_are_one_line(dataset, tmp_path):

    for args, msg in [
        (["label", str(tmp_path)], "not a silverlabel dataset"),
        (["label", str(dataset), "--teacher", "nope"], "unknown teacher 'nope'"),
        (["label", str(dataset), "--teacher", "timm:resnet18", "--checkpoint", str(tmp_path / "x.pth"),
          "--device", "cpu"], "no such checkpoint"),
        (["label", str(dataset), "--name", "../../x", "--device", "cpu"], "not a plain folder name"),
    ]:
        p = subprocess.run([sys.executable, "-m", "silverlabel.cli", *args], capture_output=True, text=True)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (dataset.parent.parent / "x").exists()


def test_changed_shard_is_relabeled(tmp_path):
    """issue 13 item 3: a shard re-fetched by ``ingest --retry-failed`` makes its labels stale."""
    images = list(photo_like_images(12, size=(320, 240), seed=7))
    with ImageServer({name: (data, "image/jpeg") for name, data in images[:11]}) as server:
        table = tmp_path / "urls.csv"
        table.write_text("url\n" + "\n".join(server.url(name) for name, _ in images) + "\n")
        ingest = IngestConfig(sources=(str(table),), output=str(tmp_path / "ds"), samples_per_shard=5, workers=1,
                              fetch=FetchConfig(retries=0, allow_private_network=True))
        run_ingest(ingest)
        label = LabelConfig(dataset=str(tmp_path / "ds"), device="cpu", decode_threads=2, topk=5)
        first = run_label(label)
        assert first.rows == 11 and first.shards_done_now == 3
        out = Path(first.output)
        before = _digest(out)
        server._files[images[11][0]] = (images[11][1], "image/jpeg", {})  # the failed URL now answers
        run_ingest(replace(ingest, retry_failed=True))
    again = run_label(label)
    assert again.shards_done_now == 1 and again.rows == 12  # only the re-fetched shard, now with its new sample
    after = _digest(out)
    assert {k for k in after if after[k] != before[k]} == {"data-000002.parquet"}
    keys = pq.read_table(out / "data-000002.parquet").column("key").to_pylist()
    assert keys == ["000000010", "000000011"]
    assert run_label(label).shards_done_now == 0


def test_class_map_beside_the_tables(labeled, dataset, tmp_path):
    """issue 17: ``labels/NAME/_classes.json`` turns the tables' class ids into wnids and names
    without the package; recorded, so ``verify`` checks it; the folder still reads as parquet."""
    import json
    import shutil

    from silverlabel.formats.labels import CLASSES_FILE as LABEL_CLASSES_FILE
    from silverlabel.verify import VerifyConfig, verify

    summary, rows = labeled
    folder = Path(summary.output)
    doc = json.loads((folder / LABEL_CLASSES_FILE).read_text())
    in21k = get_label_space("in21k")
    assert doc["label_space"] == "in21k" and doc["num_classes"] == len(doc["classes"]) == len(in21k) == 21841
    assert [c["cls"] for c in doc["classes"]] == list(range(21841))
    assert [c["wnid"] for c in doc["classes"]] == list(in21k.wnids)
    chelsea = next(r for r in rows if r["key"] == "000000000")
    top1 = doc["classes"][chelsea["labels"][0]]
    assert top1["wnid"] in CATS and top1["name"] == in21k.lemma(chelsea["labels"][0])
    assert {c["name"] for c in doc["classes"] if c["wnid"] == "n02124075"} == {"Egyptian cat"}
    record = json.loads((folder / ".done" / "classes.json").read_text())
    assert set(record["outputs"]) == {LABEL_CLASSES_FILE}
    assert pq.read_table(folder).num_rows == len(rows)  # pyarrow skips the _-file

    pool = tmp_path / "pool"
    shutil.copytree(dataset, pool)

    def problems() -> list[tuple[str, str]]:  # of this labels set (other tests leave partial ones)
        return [(p.kind, Path(p.path).name) for p in verify(VerifyConfig(str(pool))).problems
                if Path(p.path).parent.name in (folder.name, ".done") and folder.name in p.path]

    assert problems() == []
    copy = pool / "labels" / folder.name / LABEL_CLASSES_FILE
    copy.write_text(copy.read_text().replace("Egyptian cat", "Egyptian dog"))  # same size, other bytes
    assert problems() == [("corrupt", LABEL_CLASSES_FILE)]
    (pool / "labels" / folder.name / ".done" / "classes.json").unlink()
    assert problems() == [("unrecorded", LABEL_CLASSES_FILE)]
