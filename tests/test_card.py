"""``silverlabel card``: the card of a demo-like chain (ingest -> labels -> select -> shard) parses,
its numbers match the tables, the plots are real PNGs, and the HTML report works in headless
Chromium (no errors, not blank, search box, lazy rendering of 10,000 classes)."""

from __future__ import annotations

import doctest
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from silverlabel.dataset import Dataset
from silverlabel.demodata import photo_like_images
from silverlabel.errors import UserError
from silverlabel.stages.card import CardConfig, brace_pattern, run_card, size_category
from silverlabel.stages.ingest import IngestConfig, run_ingest
from silverlabel.stages.label import LABELS_SCHEMA
from silverlabel.stages.select import SelectConfig, run_select
from silverlabel.stages.shard import ShardConfig, run_shard
from silverlabel.teachers.labelspace import get_label_space

# in21k classes of the fake teacher and how many images each gets as top-1 (skewed, a long tail)
WNIDS = ["n02124075", "n07920052", "n03785016", "n01910747", "n01776313", "n02790996"]
COUNTS = [16, 11, 8, 6, 4, 3]
TOPK = 5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "silverlabel.cli", *args], capture_output=True, text=True, timeout=300)


def _fake_labels(pool: Path, seed: int = 0) -> None:
    """Labels in the COYO-Labeled schema, as `silverlabel label` writes them, from a fake teacher."""
    in21k = get_label_space("in21k")
    classes = [in21k.index(w) for w in WNIDS]
    rng = np.random.default_rng(seed)
    ds = Dataset(pool)
    samples = pq.read_table(pool / "samples").to_pylist()
    ok = [s for s in samples if s["status"] == "success"]
    top1 = np.repeat(classes, COUNTS)
    assert len(ok) == len(top1) + 1  # + the planted near-duplicate
    top1 = np.concatenate([rng.permutation(top1), [classes[0]]])
    by_shard = defaultdict(list)
    for s, c in zip(ok, top1.tolist()):
        p1 = float(rng.uniform(0.06, 0.95))
        rest = rng.dirichlet(np.ones(TOPK - 1)) * (1 - p1) * 0.8
        probs = [p1] + sorted(rest.tolist(), reverse=True)
        others = [int(x) for x in rng.choice(21841, TOPK - 1, replace=False) if x != c][: TOPK - 1]
        while len(others) < TOPK - 1:
            others.append(len(others))
        by_shard[s["shard"]].append({"id": s["id"], "url": s["url"], "imagehash": s["imagehash"], "labels": [c] + others,
                                     "label_probs": probs, "width": s["width"], "height": s["height"], "key": s["key"]})
    out = pool / "labels" / "fake"
    out.mkdir(parents=True)
    for shard, rows in by_shard.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), out / shard.replace(".tar", ".parquet"))
    man = ds.read_manifest()
    man["labels"] = {"fake": {
        "config": {"teachers": [{"name": "fake-teacher", "checkpoint": None, "activation": None, "label_space": None}],
                   "label_space": "in21k", "topk": TOPK, "img_size": None, "crop_pct": None, "interpolation": None,
                   "precision": "fp32"},
        "rows": len(ok), "decode_errors": 0, "files": len(by_shard), "partial": False, "silverlabel_version": "test"}}
    ds.write_manifest({k: v for k, v in man.items() if k not in ("format_version", "updated")})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pool (48 photos + a planted near-duplicate + a broken and a tiny file) -> fake labels ->
    select (4 classes, 2 validation each, near-duplicates removed) -> shard -> card + report."""
    root = tmp_path_factory.mktemp("card")
    folder = root / "images"
    folder.mkdir()
    images = list(photo_like_images(sum(COUNTS), size=(120, 90), seed=5))
    for name, data in images:
        (folder / name).write_bytes(data)
    im = Image.open(io.BytesIO(images[0][1]))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=60)
    (folder / "zz_copy.jpg").write_bytes(buf.getvalue())  # near-duplicate of the first photo
    (folder / "zz_broken.jpg").write_bytes(b"this is not an image")
    tiny = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(tiny, "PNG")
    (folder / "zz_tiny.png").write_bytes(tiny.getvalue())
    pool = root / "pool"
    run_ingest(IngestConfig(sources=(str(folder),), output=str(pool), samples_per_shard=20, workers=1))
    _fake_labels(pool)
    sel = root / "selection"
    run_select(SelectConfig(source=str(pool), output=str(sel), top_classes=4, val_per_class=2, min_train_per_class=2,
                            dedupe="phash:2", threads=2))
    trainset = root / "trainset"
    run_shard(ShardConfig(selection=str(sel), output=str(trainset), samples_per_shard=10, name="toy", workers=1))
    report = root / "report"
    summary = run_card(CardConfig(dataset=str(trainset), html=str(report), threads=2))
    return {"root": root, "pool": pool, "selection": sel, "trainset": trainset, "report": report, "summary": summary}


# ---------------------------------------------------------------------------------------
# parsing helpers


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5:]


def md_table(text: str, first_header: str) -> list[list[str]]:
    """Rows (cells, ** and backticks stripped) of the first table whose header starts with ``first_header``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"| {first_header} |"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip().strip("*`") for c in row.strip("|").split(" | ")])
            return rows
    raise AssertionError(f"no table starting with {first_header!r}")


def num(s: str) -> float:
    return float(s.replace(",", "").rstrip("%"))


def section(text: str, title: str) -> str:
    start = text.index(title)
    nxt = re.search(r"\n#{2,3} ", text[start + len(title):])
    return text[start: start + len(title) + (nxt.start() if nxt else len(text))]


def threshold_table(rows: list[dict]) -> list[tuple]:
    """COYO's table computed here, independently of silverlabel.stages.label."""
    out = []
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):
        per_image = [sum(1 for p in r["label_probs"] if np.float32(p) >= t) for r in rows]
        distinct = {lab for r in rows for lab, p in zip(r["labels"], r["label_probs"]) if np.float32(p) >= t}
        out.append((t, sum(per_image) / len(rows), len(distinct), 100 * sum(1 for n in per_image if n) / len(rows)))
    return out


# ---------------------------------------------------------------------------------------
# the card


def test_helpers():
    assert size_category(999) == "n<1K" and size_category(1000) == "1K<n<10K"
    assert size_category(300_000_000) == "100M<n<1B"
    assert brace_pattern(["a-0009.tar", "a-0010.tar"]) == "a-{0009..0010}.tar"
    assert brace_pattern(["x.tar", "y-2.tar"]) == "x.tar .. y-2.tar"


def test_trainset_card_front_matter_and_numbers(chain):
    trainset, sel, pool = chain["trainset"], chain["selection"], chain["pool"]
    text = (trainset / "README.md").read_text()
    fm, body = front_matter(text)
    assert fm["pretty_name"] == "toy"
    assert fm["annotations_creators"] == ["machine-generated"]
    assert fm["task_categories"] == ["image-classification"]
    assert set(fm["task_ids"]) == {"multi-class-image-classification", "multi-label-image-classification"}
    assert fm["size_categories"] == ["n<1K"] and fm["language"] == ["en"]
    assert fm["source_datasets"] and fm["license"] == "other"

    # splits: _info.json
    info = json.loads((trainset / "_info.json").read_text())
    splits = {r[0]: r for r in md_table(body, "split")}
    assert set(splits) == set(info["splits"]) == {"train", "validation"}
    for name, s in info["splits"].items():
        row = splits[name]
        assert num(row[1]) == s["num_samples"] and num(row[2]) == len(s["filenames"])
        pattern = row[3]
        if len(s["filenames"]) > 1:
            m = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", pattern)
            expanded = [f"{m[1]}{i:0{len(m[2])}d}{m[4]}" for i in range(int(m[2]), int(m[3]) + 1)]
            assert expanded == s["filenames"]
        else:
            assert pattern == s["filenames"][0]
    total = sum(s["num_samples"] for s in info["splits"].values())
    assert f"**{total} images** in **4 classes**" in body

    # classes: the selection's rows
    rows = pq.read_table(sel / "selection").to_pylist()
    assert len(rows) == total
    per_class = Counter((r["class_name"], r["split"]) for r in rows)
    table = md_table(body, "rank")
    assert len(table) == 4
    for rank, name, wnid, train, val, tot in table:
        assert num(train) == per_class[(name, "train")] and num(val) == per_class[(name, "validation")]
        assert num(tot) == num(train) + num(val)
        assert wnid in WNIDS
    assert [num(r[5]) for r in table] == sorted((num(r[5]) for r in table), reverse=True)

    # ingest statuses: the samples table
    statuses = Counter(pq.read_table(pool / "samples", columns=["status"]).column("status").to_pylist())
    assert statuses == {"success": sum(COUNTS) + 1, "failed_decode": 1, "too_small": 1}
    st = {r[0]: num(r[1]) for r in md_table(body, "status")}
    assert st == {**statuses, "total": sum(statuses.values())}

    # what select removed: report.json; the planted copy is the near-duplicate
    report = json.loads((sel / "report.json").read_text())
    removed = {r[0]: num(r[1]) for r in md_table(body, "rule")}
    assert removed == {k.replace("_", " "): v for k, v in report["removed"].items()}
    assert removed["near duplicates phash 2"] == 1

    # COYO's threshold table over the selected samples
    ours = md_table(body, "threshold")
    want = threshold_table(rows)
    assert len(ours) == len(want)
    for r, (t, avg, distinct, share) in zip(ours, want):
        assert num(r[0]) == t and abs(num(r[1]) - avg) < 6e-4 and num(r[2]) == distinct and abs(num(r[3]) - share) < 0.06

    # creation: teacher, parameters and seeds from the lineage
    assert "fake-teacher" in body and "top-k = 5" in body
    params = {(r[0], r[1]): r[2] for r in md_table(body, "stage")}
    assert params[("select", "top_classes")] == "4" and params[("select", "dedupe")] == "phash:2"
    assert params[("ingest", "image.min_side")] == "48" and params[("shard", "samples_per_shard")] == "10"
    assert "select seed 0, shard seed 0" in body
    lineage = section(body, "### Lineage")  # each folder relative to the card's, never a path of this machine
    for shown in (f"../{pool.name}", f"../{sel.name}", "."):
        assert f"`{shown}`" in lineage
    assert str(trainset.parent) not in body
    for heading in ("### Dataset Summary", "### Data Instances", "### Data Fields", "### Data Splits",
                    "### Source Data", "### Annotations", "### Threshold statistics", "### Licensing Information",
                    "### Discussion of Biases"):
        assert heading in body


def test_data_instance_is_a_real_sample(chain):
    body = (chain["trainset"] / "README.md").read_text()
    block = re.search(r"```json\n(.*?)\n```", body, re.S).group(1)
    inst = json.loads(block)
    info = json.loads((chain["trainset"] / "_info.json").read_text())
    from silverlabel.formats.wds import iter_tar_samples, read_member

    tar = chain["trainset"] / info["splits"]["train"]["filenames"][0]
    first = next(iter_tar_samples(str(tar)))
    with open(tar, "rb") as f:
        meta = json.loads(read_member(f, *first.members["json"]))
        cls = int(read_member(f, *first.members["cls"]))
    assert inst["__key__"] == first.key and inst["cls"] == cls and inst["json"] == meta
    assert inst["jpg"].startswith("<JPEG image, ")
    fields = [r[0] for r in md_table(body, "field")]
    assert fields[:4] == ["__key__", "jpg", "cls", "json"] and "json.label_probs" in fields


def test_plots_are_real_pngs(chain):
    s = chain["summary"]
    names = sorted(Path(p).name for p in s.plots)
    assert names == sorted(["class_frequency.png", "top1_probability.png", "labels_per_threshold.png",
                            "image_sizes.png", "ingest_status.png"])
    body = (chain["trainset"] / "README.md").read_text()
    for p in s.plots:
        path = Path(p)
        assert path.parent == chain["trainset"] / "card" and f"](card/{path.name})" in body
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8_000
        im = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert im.shape[0] >= 200 and im.shape[1] >= 400 and im.std() > 10
    card = json.loads((chain["trainset"] / "card" / "card.json").read_text())
    assert card["samples"] == s.samples and card["num_classes"] == 4


def test_pool_and_selection_cards(chain, tmp_path):
    pool, sel = chain["pool"], chain["selection"]
    s = run_card(CardConfig(dataset=str(pool), output=str(tmp_path / "pool" / "README.md"), threads=2))
    assert s.kind == "pool" and (tmp_path / "pool" / "card" / "ingest_status.png").is_file()
    fm, body = front_matter((tmp_path / "pool" / "README.md").read_text())
    assert fm["pretty_name"] == "pool"
    success = sum(COUNTS) + 1
    assert s.samples == success and s.classes == len(WNIDS)
    assert num(md_table(body, "split")[0][1]) == success
    top = md_table(body, "rank")
    assert [num(r[3]) for r in top] == [COUNTS[0] + 1] + COUNTS[1:]  # top-1 counts of the labels table
    assert [r[2] for r in top] == WNIDS
    s2 = run_card(CardConfig(dataset=str(sel), output=str(tmp_path / "sel.md"), plots=False, pretty_name="My set",
                             license="cc-by-4.0", threads=2))
    fm2, body2 = front_matter((tmp_path / "sel.md").read_text())
    assert fm2["pretty_name"] == "My set" and fm2["license"] == "cc-by-4.0" and s2.plots == []
    counts = Counter(pq.read_table(sel / "selection", columns=["split"]).column("split").to_pylist())
    assert {r[0]: num(r[1]) for r in md_table(body2, "split")} == counts
    assert "![" not in body2


def test_unlabeled_pool(tmp_path):
    """A pool before `label`: statuses and sizes, no classes, no threshold table."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in photo_like_images(4, size=(100, 80), seed=2):
        (folder / name).write_bytes(data)
    run_ingest(IngestConfig(sources=(str(folder),), output=str(tmp_path / "pool"), workers=1))
    s = run_card(CardConfig(dataset=str(tmp_path / "pool"), html=str(tmp_path / "r"), threads=2))
    assert (s.samples, s.classes, s.thumbnails) == (4, 0, 0)
    assert sorted(Path(p).name for p in s.plots) == ["image_sizes.png", "ingest_status.png"]
    fm, body = front_matter((tmp_path / "pool" / "README.md").read_text())
    assert fm["task_ids"] == ["multi-class-image-classification"]
    assert {r[0]: num(r[1]) for r in md_table(body, "status")} == {"success": 4, "total": 4}
    assert "### Threshold statistics" not in body and _report_data(tmp_path / "r" / "index.html")["classes"] == []


def test_trainset_without_its_selection(chain, tmp_path):
    """A training set copied away from its lineage: splits from _info.json, classes from the shards."""
    moved = tmp_path / "moved"
    shutil.copytree(chain["trainset"], moved)
    man = json.loads((moved / "silverlabel.json").read_text())
    man["parents"][0]["location"] = "../gone"
    (moved / "silverlabel.json").write_text(json.dumps(man))
    s = run_card(CardConfig(dataset=str(moved), threads=2))
    assert s.samples == chain["summary"].samples and s.classes == 4
    assert any("not found" in n for n in s.notes)
    _, body = front_matter((moved / "README.md").read_text())
    ref = {r[1]: r[5] for r in md_table((chain["trainset"] / "README.md").read_text(), "rank")}
    assert {r[1]: r[5] for r in md_table(body, "rank")} == ref
    assert "### Threshold statistics" in body


def _copy_chain(chain, root: Path) -> dict[str, Path]:
    """The pool, selection and training set copied under ``root``, their manifests pointing at the copies."""
    out = {k: root / k for k in ("pool", "selection", "trainset")}
    for k, dst in out.items():
        shutil.copytree(chain[k], dst)
    for child, parent in (("selection", "pool"), ("trainset", "selection")):
        path = out[child] / "silverlabel.json"
        man = json.loads(path.read_text())
        man["parents"][0]["location"] = os.path.relpath(out[parent], out[child])
        path.write_text(json.dumps(man))
    return out


def test_paths_with_a_quote(chain, tmp_path, monkeypatch):
    """Datasets, the report folder and DuckDB's temporary folder in folders named with an apostrophe:
    every path reaches DuckDB quoted, and the card says the same as for the plain paths."""
    import tempfile

    quoted = tmp_path / "bob's pool"
    copies = _copy_chain(chain, quoted)
    (tmp_path / "it's tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "it's tmp"))
    ref = _report_data(chain["report"] / "index.html")
    s = run_card(CardConfig(dataset=str(copies["trainset"]), html=str(quoted / "report"), threads=2))
    assert (s.samples, s.classes, s.notes) == (chain["summary"].samples, 4, [])
    _, body = front_matter((copies["trainset"] / "README.md").read_text())
    assert "`../selection`" in body and "bob's pool" not in body  # named relative to the card, not by path
    _, ref_body = front_matter((chain["trainset"] / "README.md").read_text())
    for table in ("rank", "threshold", "rule"):
        assert md_table(body, table) == md_table(ref_body, table)
    data = _report_data(quoted / "report" / "index.html")
    assert [c["t"] for c in data["classes"]] == [c["t"] for c in ref["classes"]]
    assert data["failures"] == ref["failures"] and data["clusters"] == ref["clusters"]
    # a pool whose shards are under the quote: thumbnails found; a training set without its selection
    p = run_card(CardConfig(dataset=str(copies["pool"]), html=str(quoted / "pool report"), threads=2))
    assert p.kind == "pool" and p.thumbnails > 0
    shutil.rmtree(copies["selection"])
    t = run_card(CardConfig(dataset=str(copies["trainset"]), output=str(quoted / "alone.md"), threads=2))
    assert t.samples == s.samples and any("not found" in n for n in t.notes)


def test_labels_name_must_be_a_folder_name(chain, tmp_path):
    """A labels name read from a manifest becomes a path component only when it is a plain name."""
    pool = tmp_path / "pool"
    shutil.copytree(chain["pool"], pool)
    man = json.loads((pool / "silverlabel.json").read_text())
    for bad in ("../../elsewhere", "..", "a/b", "nul\x00"):
        man["labels"] = {bad: man["labels"][next(iter(man["labels"]))]}
        (pool / "silverlabel.json").write_text(json.dumps(man))
        with pytest.raises(UserError, match="not a plain folder name"):
            run_card(CardConfig(dataset=str(pool), plots=False, threads=2))


def test_doctests():
    import silverlabel.stages.card as card_pkg

    for name in ("lineage", "facts", "plots", "markdown", "report", "hub"):
        mod = importlib.import_module(f"silverlabel.stages.card.{name}")
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0, name
    assert doctest.testmod(card_pkg).failed == 0


def test_cli(chain, tmp_path):
    p = _cli("card", str(chain["selection"]), "-o", str(tmp_path / "c.md"), "--html", str(tmp_path / "r"),
             "--per-class", "2", "--no-plots")
    assert p.returncode == 0, p.stderr
    assert str(tmp_path / "c.md") in p.stdout and str(tmp_path / "r" / "index.html") in p.stdout
    bad = _cli("card", str(tmp_path / "nope"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr
    notds = tmp_path / "empty"
    notds.mkdir()
    bad = _cli("card", str(notds))
    assert bad.returncode == 2 and "not a silverlabel dataset" in bad.stderr
    assert "examples:" in _cli("card", "--help").stdout


# ---------------------------------------------------------------------------------------
# the report


def _report_data(index: Path) -> dict:
    html = index.read_text()
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_report_is_self_contained(chain):
    report = chain["report"]
    html = (report / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no CDN, no network
    assert "url(http" not in html and "@import" not in html
    data = _report_data(report / "index.html")
    sel = pq.read_table(chain["selection"] / "selection").to_pylist()
    per_class = Counter(r["cls"] for r in sel)
    assert {c["c"]: c["t"] for c in data["classes"]} == dict(per_class)
    for c in data["classes"]:
        assert len(c["i"]) == min(8, per_class[c["c"]])
        assert all(it["x"] >= 0 for it in c["i"])  # every thumbnail found
        sprite = Image.open(report / "thumbs" / f"c{c['c']}.jpg")
        assert sprite.size == (96 * len(c["i"]), 96)
    least = sorted(r["label_probs"][0] for r in sel)[: len(data["least"])]
    assert [round(it["p"][0][1], 4) for it in data["least"]] == [round(p, 4) for p in least]
    [cluster] = data["clusters"]
    dup = pq.read_table(chain["selection"] / "duplicates.parquet").to_pylist()
    assert [(d["removed_key"], d["kept_key"]) for d in dup] == [(cluster["removed"][0]["k"], cluster["kept"])]
    assert cluster["x"] == [0, 1]
    assert {f["status"]: f["n"] for f in data["failures"]} == {"failed_decode": 1, "too_small": 1}
    assert {p["src"] for p in data["plots"]} == {f"plots/{Path(p).name}" for p in chain["summary"].plots}
    assert all((report / p["src"]).is_file() for p in data["plots"])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from chromium_cdp import Chromium, find_chromium

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with Chromium(tmp_path_factory.mktemp("chromium") / "profile") as b:
        yield b


def test_report_in_headless_chromium(chain, browser, tmp_path):
    from chromium_cdp import screenshot_png

    index = chain["report"] / "index.html"
    page = browser.open(index.resolve().as_uri())
    try:
        assert page.wait_for("document.querySelectorAll('section.cls .cell').length > 0")
        n_sections = page.evaluate("document.querySelectorAll('section.cls').length")
        assert n_sections == 4
        # every sprite the page uses loads
        widths = page.evaluate("""Promise.all([...new Set([...document.querySelectorAll('.img')]
              .map(e => e.style.backgroundImage).filter(Boolean))].map(u => new Promise(r => {
              const i = new Image(); i.onload = () => r(i.naturalWidth); i.onerror = () => r(0);
              i.src = u.slice(5, -2); })))""", await_promise=True)
        assert widths and all(w > 0 for w in widths)
        assert page.evaluate("[...document.querySelectorAll('.plots img')].length") == 5
        png = screenshot_png(page)
        (tmp_path / "report.png").write_bytes(png)
        im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
        assert im.shape[:2] == (900, 1200) and im.std() > 20  # not blank
        # the search box: typed text filters the class sections
        name = _report_data(index)["classes"][1]["n"]
        page.evaluate("document.getElementById('q').focus()")
        page.call("Input.insertText", {"text": "no-such-class-xyz"})
        visible = "[...document.querySelectorAll('section.cls')].filter(s => s.offsetParent !== null).length"
        assert page.wait_for(f"{visible} === 0", timeout=5) is True
        page.evaluate("document.getElementById('q').value = ''")
        page.call("Input.insertText", {"text": name})
        assert page.wait_for(f"{visible} >= 1 && {visible} < 4", timeout=5) is True
        assert name in page.evaluate("document.querySelector('section.cls:not(.hidden) h3').textContent")
        assert "of 4 classes" in page.evaluate("document.getElementById('count').textContent")
        assert page.errors() == []
    finally:
        page.close()


def test_report_of_10000_classes_is_fast_and_lazy(tmp_path, browser):
    """10,000 classes (a bare COYO-Labeled table: no images, so no thumbnails): the page loads fast
    and renders only the class grids near the viewport; search finds one class among them."""
    n_cls, per = 10_000, 2
    in21k = get_label_space("in21k")
    cls = np.repeat(np.arange(n_cls, dtype=np.int32), per)
    n = len(cls)
    offs = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    labels = pa.ListArray.from_arrays(offs, pa.array(np.stack([cls, (cls + 1) % 21841], 1).reshape(-1)))
    p1 = np.linspace(0.2, 0.9, n, dtype=np.float32)
    probs = pa.ListArray.from_arrays(offs, pa.array(np.stack([p1, (1 - p1) / 2], 1).reshape(-1)))
    pq.write_table(pa.table({"id": pa.array(np.arange(n, dtype=np.int64)), "labels": labels, "label_probs": probs}),
                   tmp_path / "coyo.parquet")
    run_select(SelectConfig(source=str(tmp_path / "coyo.parquet"), output=str(tmp_path / "sel"), threads=2))
    t0 = time.monotonic()
    s = run_card(CardConfig(dataset=str(tmp_path / "sel"), html=str(tmp_path / "r"), plots=False, threads=2))
    assert s.classes == n_cls and time.monotonic() - t0 < 120
    page = browser.open((tmp_path / "r" / "index.html").resolve().as_uri())
    try:
        assert page.evaluate("document.querySelectorAll('section.cls').length") == n_cls
        assert page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") < 15_000
        page.evaluate("document.getElementById('classes').scrollIntoView()")
        assert page.wait_for("document.querySelectorAll('section.cls[data-done]').length > 0")
        time.sleep(0.3)
        rendered = page.evaluate("document.querySelectorAll('section.cls[data-done]').length")
        assert 0 < rendered < 200  # lazy: only what is near the viewport
        wnid = in21k.wnids[4321]
        page.evaluate(f"location.hash = 'q={wnid}'; silverlabelReport.filter({json.dumps(wnid)})")
        visible = "[...document.querySelectorAll('section.cls')].filter(s => s.offsetParent !== null)"
        assert page.wait_for(f"{visible}.length === 1", timeout=5) is True
        assert wnid in page.evaluate(f"{visible}[0].textContent")
        assert page.errors() == []
    finally:
        page.close()
