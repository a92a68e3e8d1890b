"""The examples/ recipes run end to end (scaled far down) on a real ingested + labeled pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from silverlabel.cli import main as cli_main
from silverlabel.demodata import ImageServer, photo_like_images, real_photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = tmp_path_factory.mktemp("examples")
    files = {name: (data, "image/jpeg") for name, data in photo_like_images(90, seed=5)}
    files.update({name: (data, "image/png" if name.endswith(".png") else "image/jpeg") for name, data in real_photos()})
    with ImageServer(files) as srv:
        urls = [srv.base_url.rstrip("/") + "/" + n for n in sorted(files)]
        pq.write_table(pa.table({"url": urls}), base / "urls.parquet")
        assert cli_main(["ingest", str(base / "urls.parquet"), "-o", str(base / "pool"), "--workers", "1",
                         "--retries", "0", "--no-progress"]) == 0
    assert cli_main(["label", str(base / "pool"), "--no-progress"]) == 0
    return base


def _run(script, pool, out, **env):
    e = dict(os.environ, POOL=str(pool / "pool"), OUT=str(out), SL=f"{sys.executable} -m silverlabel.cli",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env)
    p = subprocess.run(["bash", str(ROOT / "examples" / script)], env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_coyo_vit_recipe(pool, tmp_path):
    out = tmp_path / "coyo"
    _run("coyo_vit.sh", pool, out, MODEL="test_vit", PRE_SIZE="32", FT_SIZE="48", PRE_STEPS="3", FT_STEPS="2",
         BATCH="8", FT_CLASSES="3", FT_VAL="1", FT_MIN_TRAIN="2", LOWSHOT="0.5")
    pre = torch_load(out / "pretrain" / "checkpoint-final.pt")
    assert pre["config"]["loss"] == "bce-multihot" and pre["model"]["head.weight"].shape[0] == 21841
    assert pre["model"]["pos_embed"].shape[1] == 1 + 2 * 2
    ft = torch_load(out / "finetune" / "checkpoint-final.pt")
    assert ft["model"]["head.weight"].shape[0] == 3 and ft["model"]["pos_embed"].shape[1] == 1 + 3 * 3
    ev = json.loads((out / "finetune" / "eval-validation.json").read_text())
    assert ev["counts"]["samples"] == 3 and ev["real"]["count"] >= 1
    ls = json.loads((out / "pretrain" / "lowshot" / "lowshot.json").read_text())
    assert set(ls["results"]["50pct"]) == {"probe", "finetune"}
    assert (out / "pretrain" / "tb").is_dir()


def test_imagenet12k_recipe(pool, tmp_path):
    out = tmp_path / "12k"
    _run("imagenet12k.sh", pool, out, MODEL="test_vit", IMG="32", STEPS="2", BATCH="4", CLASSES="3", VAL="1",
         MIN_TRAIN="2", SHARDS="train=2,validation=1")
    info = json.loads((out / "trainset" / "_info.json").read_text())
    assert len(info["splits"]["train"]["filenames"]) == 2 and info["splits"]["validation"]["num_samples"] == 3
    classes = json.loads((out / "trainset" / "classes.json").read_text())
    assert classes["label_space"] == "in12k" and classes["num_classes"] == 3
    ev = json.loads((out / "run" / "eval-validation.json").read_text())
    assert ev["counts"]["samples"] == 3


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
