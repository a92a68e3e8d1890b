"""issue 17: what ``silverlabel card`` writes is what the Hub needs. ``datasets.load_dataset(folder)``
(what the Hub does with a pushed folder) loads a training set, a pool and a selection from the
card's ``configs``, with the class names as a ``ClassLabel``; the declared features are the ones
``datasets``' webdataset builder infers itself; a rerun keeps what the user wrote."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from silverlabel.demodata import photo_like_images
from silverlabel.stages.card import CardConfig, run_card
from silverlabel.stages.card.hub import class_label_names, merge_body, shard_glob
from silverlabel.stages.ingest import IngestConfig, run_ingest
from silverlabel.stages.select import SelectConfig, run_select
from silverlabel.stages.shard import ShardConfig, run_shard
from test_card import COUNTS, _fake_labels, front_matter


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """``datasets`` offline, with its caches in a temporary folder (never ~/.cache)."""
    home = tmp_path_factory.mktemp("hf")
    mp = pytest.MonkeyPatch()
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
                 "HF_DATASETS_CACHE": str(home / "datasets")}.items():
        mp.setenv(k, v)
    import datasets

    datasets.disable_progress_bars()
    yield datasets, str(home / "datasets")
    mp.undo()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pool (48 photos + a near-duplicate) -> fake labels -> select (4 classes) -> shard, each with its card."""
    root = tmp_path_factory.mktemp("hub")
    folder = root / "images"
    folder.mkdir()
    images = list(photo_like_images(sum(COUNTS), size=(96, 72), seed=5))
    for name, data in images:
        (folder / name).write_bytes(data)
    buf = io.BytesIO()
    Image.open(io.BytesIO(images[0][1])).save(buf, "JPEG", quality=60)
    (folder / "zz_copy.jpg").write_bytes(buf.getvalue())
    pool = root / "pool"
    run_ingest(IngestConfig(sources=(str(folder),), output=str(pool), samples_per_shard=20, workers=1))
    _fake_labels(pool)
    sel = root / "selection"
    run_select(SelectConfig(source=str(pool), output=str(sel), top_classes=4, val_per_class=2, min_train_per_class=2,
                            dedupe="phash:2", threads=2))
    trainset = root / "trainset"
    run_shard(ShardConfig(selection=str(sel), output=str(trainset), samples_per_shard=10, name="toy", workers=1))
    for d in (pool, sel, trainset):
        run_card(CardConfig(dataset=str(d), plots=False, threads=2))
    return {"pool": pool, "selection": sel, "trainset": trainset}


def test_trainset_loads_with_class_names(chain, hf):
    datasets, cache = hf
    ts = chain["trainset"]
    info = json.loads((ts / "_info.json").read_text())
    classes = json.loads((ts / "classes.json").read_text())["classes"]
    fm, _ = front_matter((ts / "README.md").read_text())
    # the wids indexes, _info.json and classes.json are not data
    (config,) = fm["configs"]
    assert config["config_name"] == "default"
    assert {f["split"]: f["path"] for f in config["data_files"]} == {"train": "toy-train-*.tar",
                                                                      "validation": "toy-validation-0000.tar"}

    ds = datasets.load_dataset(str(ts), cache_dir=cache)
    assert set(ds) == set(info["splits"]) == {"train", "validation"}
    names = [c["name"] for c in sorted(classes, key=lambda c: c["cls"])]
    for split, s in info["splits"].items():
        d = ds[split]
        assert d.num_rows == s["num_samples"]
        assert isinstance(d.features["cls"], datasets.ClassLabel) and d.features["cls"].names == names
        assert isinstance(d.features["jpg"], datasets.Image)
        rows = d.to_list()
        assert all(d.features["cls"].int2str(r["cls"]) == r["json"]["class_name"] for r in rows)
        assert {Path(r["__url__"]).name for r in rows} == set(s["filenames"])
        assert len({r["__key__"] for r in rows}) == s["num_samples"]
    img = ds["validation"][0]["jpg"]
    assert img.size == (ds["validation"][0]["json"]["width"], ds["validation"][0]["json"]["height"])
    assert Counter(ds["train"].features["cls"].int2str(ds["train"]["cls"])) == {
        c["name"]: c["train"] for c in classes}

    # the declared features are what the webdataset builder infers itself, but cls's names
    inferred = datasets.load_dataset("webdataset", data_files={"train": [str(ts / f) for f in
                                                                           info["splits"]["train"]["filenames"]]},
                                     cache_dir=cache, split="train").features
    declared = ds["train"].features
    assert list(inferred) == list(declared) and list(declared)[:2] == ["jpg", "cls"]
    assert inferred["cls"] == datasets.Value("int64")
    # a field null in every sample read is declared a string (a later sample's value fits it)
    as_read = json.dumps(inferred._to_yaml_list()).replace('"dtype": "null"', '"dtype": "string"')
    assert json.loads(as_read)[2:] == declared._to_yaml_list()[2:]  # all but jpg and cls
    assert '"null"' in json.dumps(inferred._to_yaml_list())  # the folder source has no url: a real case


def test_pool_loads_samples_and_each_labels_set(chain, hf):
    datasets, cache = hf
    pool = chain["pool"]
    fm, _ = front_matter((pool / "README.md").read_text())
    assert [c["config_name"] for c in fm["configs"]] == ["samples", "labels-fake"]
    assert datasets.get_dataset_config_names(str(pool)) == ["samples", "labels-fake"]
    samples = pq.read_table(pool / "samples")
    ds = datasets.load_dataset(str(pool), cache_dir=cache)  # the default config: samples
    assert list(ds) == ["train"] and ds["train"].num_rows == samples.num_rows
    assert sorted(ds["train"]["key"]) == sorted(samples.column("key").to_pylist())
    labels = pq.read_table(pool / "labels" / "fake")
    lab = datasets.load_dataset(str(pool), "labels-fake", cache_dir=cache, split="train")
    assert lab.num_rows == labels.num_rows and set(lab.column_names) == set(labels.column_names)
    sel = datasets.load_dataset(str(chain["selection"]), cache_dir=cache, split="train")
    rows = pq.read_table(chain["selection"] / "selection")
    assert sel.num_rows == rows.num_rows and Counter(sel["split"]) == Counter(rows.column("split").to_pylist())


def test_rerun_keeps_user_sections_and_yaml(chain, tmp_path):
    ts = tmp_path / "ts"
    shutil.copytree(chain["trainset"], ts)
    readme = ts / "README.md"
    text = readme.read_text()
    fm, body = front_matter(text)
    assert fm["license"] == "other" and "homepage" not in fm
    # the user: a YAML key of their own, another license, a config of their own, a tag;
    # a written section, and an edit inside a generated block
    fm.update(homepage="https://example.org/toy", license="cc-by-4.0", tags=fm["tags"] + ["birds"],
              pretty_name="Toy Birds")
    fm["configs"].append({"config_name": "val-only", "data_files": [{"split": "validation",
                                                                     "path": "toy-validation-*.tar"}]})
    mine = "We made this to test silverlabel's cards.\n"
    body = body.replace("[More Information Needed] (why this dataset was made; silverlabel recorded how, below.)\n",
                        mine, 1)
    assert mine in body
    generated = body.index("### Dataset Summary")
    body = body[:generated] + "### Dataset Summary\n\nSTALE NUMBERS\n" + body[body.index("### Supported Tasks"):]
    readme.write_text("---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n" + body)

    run_card(CardConfig(dataset=str(ts), plots=False, threads=2))
    fm2, body2 = front_matter(readme.read_text())
    assert fm2["homepage"] == "https://example.org/toy" and fm2["license"] == "cc-by-4.0"
    assert fm2["pretty_name"] == "Toy Birds" and "# Dataset Card for Toy Birds\n" in body2
    assert fm2["tags"][-1] == "birds" and "silverlabel" in fm2["tags"]
    assert [c["config_name"] for c in fm2["configs"]] == ["default", "val-only"]
    assert fm2["dataset_info"] == fm["dataset_info"]
    total = sum(s["num_samples"] for s in json.loads((ts / "_info.json").read_text())["splits"].values())
    assert mine in body2 and "STALE NUMBERS" not in body2 and f"**{total} images** in **4 classes**" in body2
    assert "The license field above (`cc-by-4.0`)" in body2
    once = readme.read_bytes()
    run_card(CardConfig(dataset=str(ts), plots=False, threads=2))
    assert readme.read_bytes() == once  # a rerun changes nothing more

    run_card(CardConfig(dataset=str(ts), plots=False, threads=2, license="mit", task_categories=("image-to-text",)))
    fm3, body3 = front_matter(readme.read_text())
    assert fm3["license"] == "mit" and fm3["task_categories"] == ["image-to-text"] and mine in body3
    assert fm3["homepage"] == "https://example.org/toy"


def test_hand_written_readme_is_kept(chain, tmp_path):
    ts = tmp_path / "ts"
    shutil.copytree(chain["trainset"], ts)
    mine = "---\nlicense: mit\nfoo: bar\n---\n# My toy set\n\nWritten by hand.\n"
    (ts / "README.md").write_text(mine)
    run_card(CardConfig(dataset=str(ts), plots=False, threads=2))
    fm, body = front_matter((ts / "README.md").read_text())
    assert fm["license"] == "mit" and fm["foo"] == "bar" and fm["configs"][0]["config_name"] == "default"
    assert body.lstrip().startswith("# My toy set\n\nWritten by hand.\n")
    assert "<!-- silverlabel:begin structure -->" in body and "### Curation Rationale" not in body


def test_card_elsewhere_has_no_data_files(chain, tmp_path):
    """-o outside the dataset: the Hub resolves data_files from the README's folder, so none are written."""
    run_card(CardConfig(dataset=str(chain["trainset"]), output=str(tmp_path / "c.md"), plots=False, threads=2))
    fm, _ = front_matter((tmp_path / "c.md").read_text())
    assert "configs" not in fm and "dataset_info" not in fm and fm["license"] == "other"


def test_helpers():
    files = ["a-0000.tar", "a-0001.tar", "a-0010.tar"]
    assert shard_glob(files, files + ["a.wids.json", "b-0000.tar"]) == "a-*.tar"
    assert shard_glob(files, files + ["a-extra.tar"]) == files  # the glob would take a stranger
    assert shard_glob(["x.tar"], ["x.tar", "y.tar"]) == "x.tar"
    doc = {"classes": [{"cls": 1, "wnid": "n2", "name": "crane"}, {"cls": 0, "wnid": "n1", "name": "crane"},
                       {"cls": 2, "wnid": "n3", "name": "cat"}]}
    assert class_label_names(doc) == ["crane (n1)", "crane (n2)", "cat"]
    assert class_label_names({"classes": [{"cls": 1, "name": "x"}]}) is None  # not 0..n-1
    assert class_label_names(None) is None
    blocks = [("a", "A1\n"), (None, "user\n"), ("b", "B1\n")]
    fresh = merge_body(None, blocks)
    edited = fresh.replace("user\n", "mine\n").replace("A1", "hand edit")
    again = merge_body(edited, [("a", "A2\n"), (None, "user\n"), ("b", "B2\n")])
    assert "mine\n" in again and "A2" in again and "B2" in again and "hand edit" not in again and "user" not in again
    without_b = edited[:edited.index("<!-- silverlabel:begin b")]
    assert "B2" not in merge_body(without_b, [("a", "A2\n"), ("b", "B2\n")])  # a block the user deleted stays so


def test_broken_yaml_is_a_clear_error_and_kept(chain, tmp_path):
    from silverlabel.errors import UserError

    ts = tmp_path / "ts"
    shutil.copytree(chain["trainset"], ts)
    broken = "---\nlicense: [mit\n---\n# Mine\n"
    (ts / "README.md").write_text(broken)
    with pytest.raises(UserError, match="README.md: the card's YAML front matter"):
        run_card(CardConfig(dataset=str(ts), plots=False, threads=2))
    assert (ts / "README.md").read_text() == broken
