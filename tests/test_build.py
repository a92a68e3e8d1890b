"""``silverlabel build``: a recipe of real stages (a folder of photos -> ingest -> select ->
shard), rebuilt only where its config or inputs changed."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re

import pytest

from silverlabel import pipeline
from silverlabel.demodata import photo_like_images
from silverlabel.errors import UserError

RECIPE = """\
description: a folder of photos, its class folders as labels, two shards
out: out
vars:
  photos: photos
steps:
  pool:
    stage: ingest
    sources: ["${vars.photos}"]
    output: pool
    samples_per_shard: 6
    workers: 1
  sel:
    stage: select
    source: ${pool}
    output: sel
    label: source
    val_per_class: 1
  trainset:
    stage: shard
    selection: ${sel}
    output: trainset
    shards: 2
    name: toy
    workers: 1
smoke:
  steps.trainset.shards: 1
"""


@pytest.fixture()
def recipe(tmp_path):
    photos = list(photo_like_images(12, size=(96, 72), seed=3))
    for i, (name, data) in enumerate(photos):
        d = tmp_path / "photos" / ("cat", "dog", "fox")[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path / "recipe.yaml"


@pytest.fixture()
def no_stage_runs(monkeypatch):
    """Make every stage's run function fail: a build that calls one fails the test."""
    for kind in pipeline.STAGES.values():
        if kind.module:
            monkeypatch.setattr(f"silverlabel.stages.{kind.module}.{kind.run}", _forbidden)


def _build(path, *overrides, **kw):
    return pipeline.build(pipeline.load_recipe(path, overrides=overrides), log=lambda m: None, **kw)


def _plan(path, *overrides, **kw):
    return {p.step.name: p.reason for p in pipeline.plan(pipeline.load_recipe(path, overrides=overrides), **kw)}


def test_second_build_does_nothing(recipe, monkeypatch):
    s = _build(recipe)
    assert s.ran == ["pool", "sel", "trainset"] and s.skipped == []
    out = recipe.parent / "out"
    info = json.loads((out / "trainset" / "_info.json").read_text())
    assert len(info["splits"]["train"]["filenames"]) == 2
    state = json.loads((out / "trainset" / ".build-trainset.json").read_text())
    assert state["inputs"] == {"selection:${out}/sel": "step:sel:" + json.loads(  # no path of this machine
        (out / "sel" / ".build-sel.json").read_text())["output"]}
    assert _plan(recipe) == dict.fromkeys(["pool", "sel", "trainset"], "up to date")

    for kind in pipeline.STAGES.values():
        if kind.module:
            monkeypatch.setattr(f"silverlabel.stages.{kind.module}.{kind.run}", _forbidden)
    s = _build(recipe)
    assert s.ran == [] and s.skipped == ["pool", "sel", "trainset"]


def test_an_edit_reruns_that_step_and_what_depends_on_it(recipe):
    _build(recipe)
    out = recipe.parent / "out"
    pool_state = (out / "pool" / ".build-pool.json").read_text()
    assert _plan(recipe, "steps.trainset.seed=1") == {
        "pool": "up to date", "sel": "up to date", "trainset": "config changed"}
    assert _plan(recipe, "steps.sel.val_per_class=2") == {
        "pool": "up to date", "sel": "config changed", "trainset": "input changed (sel reruns)"}
    s = _build(recipe, "steps.sel.val_per_class=2")
    assert s.ran == ["sel", "trainset"] and s.skipped == ["pool"]
    assert (out / "pool" / ".build-pool.json").read_text() == pool_state
    report = json.loads((out / "sel" / "report.json").read_text())
    assert "validation" in json.dumps(report)
    # a runtime field (worker count) is no change
    assert _plan(recipe, "steps.sel.val_per_class=2", "steps.trainset.workers=2")["trainset"] == "up to date"
    # back to the recipe as written: sel and trainset again
    assert _build(recipe).ran == ["sel", "trainset"]


def test_changed_source_files_rerun_everything(recipe):
    _build(recipe)
    extra = next(iter(photo_like_images(1, size=(96, 72), seed=9)))[1]
    (recipe.parent / "photos" / "cat" / "new.jpg").write_bytes(extra)
    assert _plan(recipe) == {"pool": "input changed (sources)", "sel": "input changed (pool reruns)",
                             "trainset": "input changed (sel reruns)"}
    assert _build(recipe).ran == ["pool", "sel", "trainset"]
    man = json.loads((recipe.parent / "out" / "pool" / "silverlabel.json").read_text())
    assert man["counts"]["success"] == 13


def test_missing_outputs_rerun_the_step(recipe):
    _build(recipe)
    (recipe.parent / "out" / "trainset" / "_info.json").unlink()
    assert _plan(recipe)["trainset"].startswith("outputs missing")
    assert _build(recipe).ran == ["trainset"]


def test_only_from_force_and_smoke(recipe):
    with pytest.raises(UserError, match="needs step 'sel', which has not been built"):
        _build(recipe, only=["trainset"])
    assert _build(recipe, only=["pool"]).ran == ["pool"]
    assert _build(recipe, from_step="sel").ran == ["sel", "trainset"]
    assert _build(recipe, only=["sel"], force=True).ran == ["sel"]
    # trainset follows sel's new output (its manifest may differ only in its timestamps)
    same = json.loads((recipe.parent / "out" / "sel" / ".build-sel.json").read_text())["output"] == json.loads(
        (recipe.parent / "out" / "trainset" / ".build-trainset.json").read_text())["inputs"].popitem()[1][9:]
    assert _plan(recipe)["trainset"] == ("up to date" if same else "input changed (sel)")
    r = pipeline.load_recipe(recipe, smoke=True)
    assert r.step("trainset").config.shards == 1


def test_cli_dry_run_prints_the_plan_and_runs_nothing(recipe, tmp_path, no_stage_runs):
    ap = argparse.ArgumentParser()
    pipeline.add_build_parser(ap.add_subparsers(dest="command"))
    out = tmp_path / "elsewhere"
    args = ap.parse_args(["build", str(recipe), "--dry-run", "--out", str(out), "--set", "steps.trainset.seed=4"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    text = buf.getvalue()
    assert f"-> {out}" in text
    for step in ("pool", "sel", "trainset"):
        assert f"{step}" in text
    assert text.count("run   new") == 3
    assert not out.exists()


def test_build_draws_the_stages_progress_with_totals(recipe, capsys):
    from silverlabel.cli import main

    assert main(["build", str(recipe), "--progress"]) == 0
    err = capsys.readouterr().err
    # each stage's own bar (silverlabel.log.Progress): ingest's 12 photos, shard's 12 samples, with totals
    assert re.search(r"ingest: 100%.* 12/12 .*img/s", err) and re.search(r"shard: 100%.* 12/12 .*sample/s", err), err
    assert main(["build", str(recipe), "--progress", "--force", "-q"]) == 0
    assert "%|" not in capsys.readouterr().err  # -q: no bars
    assert main(["build", str(recipe), "--progress", "--force", "--only", "pool", "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err


def test_recipe_errors_name_the_step_and_key(recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("    label: source\n", "    label: source\n    top_class: 3\n"))
    with pytest.raises(UserError, match=r"step 'sel': unknown key 'top_class' .*did you mean top_classes"):
        pipeline.load_recipe(bad)
    bad.write_text(RECIPE.replace("${sel}", "${trainset}"))
    with pytest.raises(UserError, match=r"step 'trainset': \$\{trainset\}: no earlier step"):
        pipeline.load_recipe(bad)
    bad.write_text(RECIPE.replace("stage: shard", "stage: shred"))
    with pytest.raises(UserError, match="unknown stage 'shred'"):
        pipeline.load_recipe(bad)
    bad.write_text(RECIPE.replace("  pool:\n", "  vars:\n", 1))
    with pytest.raises(UserError, match="a step name is a word"):
        pipeline.load_recipe(bad)
    with pytest.raises(UserError, match="unknown key 'nope'"):
        pipeline.load_recipe(recipe, overrides=["steps.pool.nope=1"])
    with pytest.raises(UserError, match="no step named 'x'"):
        pipeline.plan(pipeline.load_recipe(recipe), only=["x"])


def test_paths_nested_configs_and_types(recipe, tmp_path, monkeypatch):
    r = pipeline.load_recipe(recipe, overrides=[
        "steps.pool.image={min_side: 32}", "steps.pool.fetch={retries: 0}", "steps.sel.min_prob=1e-1"])
    pool, sel = r.step("pool").config, r.step("sel").config
    assert pool.output == str(recipe.parent / "out" / "pool")
    assert pool.sources == (str(recipe.parent / "photos"),)
    assert pool.image.min_side == 32 and pool.fetch.retries == 0
    assert sel.source == pool.output and sel.min_prob == 0.1
    ray = pipeline.load_recipe(recipe, overrides=["steps.sel.engine=ray", "steps.sel.workers=4"]).step("sel")
    assert ray.run_args == {"engine": "ray", "workers": 4}  # run_select's options, beside the config
    assert pipeline.config_digest(ray) == pipeline.config_digest(pipeline.load_recipe(recipe).step("sel"))
    assert r.step("trainset").deps == ("sel",)
    (tmp_path / "w.pth").write_bytes(b"weights")
    lab = tmp_path / "label.yaml"
    lab.write_text("steps:\n  lab:\n    stage: label\n    dataset: pool\n"
                   "    teachers: [efficientnet_lite0, {name: 'timm:resnet18', checkpoint: w.pth}]\n")
    step = pipeline.load_recipe(lab).step("lab")
    assert [t.name for t in step.config.teachers] == ["efficientnet_lite0", "timm:resnet18"]
    assert step.inputs["teachers"] == [str(tmp_path / "w.pth")] and step.state_path == tmp_path / "pool" / ".build-lab.json"
    monkeypatch.chdir(tmp_path)  # a --set vars.NAME=PATH that exists is taken from the current folder
    assert pipeline.load_recipe(recipe, overrides=["vars.photos=photos"]).step("pool").config.sources == (
        str(tmp_path / "photos"),)


def test_the_demo_recipe_loads():
    from silverlabel.demo import recipe_path

    r = pipeline.load_recipe(recipe_path(), out="/tmp/demo-out")
    assert [s.stage for s in r.steps] == ["ingest", "label", "select", "shard", "train", "train", "eval",
                                          "lowshot", "card"]
    assert r.step("finetune").config.init == "/tmp/demo-out/runs/pretrain/checkpoint-final.pt"
    assert r.step("finetune").deps == ("trainset", "pretrain")


@pytest.mark.slow
def test_make_demo_twice(tmp_path, monkeypatch):
    """``make demo`` builds its recipe; ``--keep`` a second time finds every step up to date."""
    from silverlabel import demo

    out = str(tmp_path / "demo")
    assert demo.main(["--out", out]) == 0
    for kind in pipeline.STAGES.values():
        if kind.module:
            monkeypatch.setattr(f"silverlabel.stages.{kind.module}.{kind.run}", _forbidden)
    assert demo.main(["--out", out, "--keep"]) == 0
    assert all(p.action == "skip" for p in pipeline.plan(pipeline.load_recipe(demo.recipe_path(), out=out)))


def _forbidden(*a, **k):
    raise AssertionError("a stage ran")


def test_a_rerun_never_removes_the_output_root(recipe):
    assert _build(recipe, "steps.pool.output=${out}").ran == ["pool", "sel", "trainset"]
    assert (recipe.parent / "out" / ".build-pool.json").exists()
    with pytest.raises(UserError, match="holds the output root"):
        _build(recipe, "steps.pool.output=${out}", "steps.pool.samples_per_shard=4")
    assert (recipe.parent / "out" / "trainset" / "_info.json").exists()
