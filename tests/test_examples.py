"""The examples/ recipes run end to end through ``silverlabel build --smoke`` (their ``smoke:``
overrides scale them far down) on a real ingested + labeled pool."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from silverlabel import pipeline
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
                         "--retries", "0", "--no-progress", "--allow-private-network"]) == 0
    assert cli_main(["label", str(base / "pool"), "--no-progress"]) == 0
    return base


def _build(recipe, pool, out, *extra):
    """``silverlabel build examples/RECIPE --smoke --out OUT --set vars.pool=POOL`` (the parser
    cli.py registers)."""
    ap = argparse.ArgumentParser()
    pipeline.add_build_parser(ap.add_subparsers())
    args = ap.parse_args(["build", str(ROOT / "examples" / recipe), "--smoke", "--out", str(out),
                          "--set", f"vars.pool={pool / 'pool'}", *extra])
    assert args.func(args) == 0
    return pipeline.load_recipe(args.recipe, out=args.out, overrides=args.overrides, smoke=True)


def test_coyo_vit_recipe(pool, tmp_path):
    out = tmp_path / "coyo"
    recipe = _build("coyo_vit.yaml", pool, out)
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
    # a second build redoes nothing; a changed fine-tune redoes only it and what reads it
    assert [p.reason for p in pipeline.plan(recipe)] == ["up to date"] * len(recipe.steps)
    edited = pipeline.load_recipe(recipe.path, out=str(out), smoke=True, overrides=[
        f"vars.pool={pool / 'pool'}", "steps.finetune.lr=1e-3"])
    assert [p.step.name for p in pipeline.plan(edited) if p.action == "run"] == ["finetune", "eval"]


def test_imagenet12k_recipe(pool, tmp_path):
    out = tmp_path / "12k"
    recipe = _build("imagenet12k.yaml", pool, out)
    info = json.loads((out / "trainset" / "_info.json").read_text())
    assert len(info["splits"]["train"]["filenames"]) == 2 and info["splits"]["validation"]["num_samples"] == 3
    classes = json.loads((out / "trainset" / "classes.json").read_text())
    assert classes["label_space"] == "in12k" and classes["num_classes"] == 3
    ev = json.loads((out / "run" / "eval-validation.json").read_text())
    assert ev["counts"]["samples"] == 3
    assert [s.stage for s in recipe.steps] == ["select", "shard", "train", "eval"]


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
