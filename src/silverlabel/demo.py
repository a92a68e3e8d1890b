"""``make demo``: the pipeline end to end on bundled data, served over real HTTP.

Starts a loopback HTTP server with scikit-image's real photos and a few hundred
photo-like images made from them (plus a few broken links, so the samples table shows
failures too), writes a URL table, ingests it, labels it with the default teacher
(EfficientNet-Lite0, real ImageNet weights; GPU if present), prints COYO's threshold
table and the top labels of a few real photos, selects the largest classes with a
validation split (near-duplicates removed), writes pre-shuffled timm-ready shards,
pretrains a tiny ViT on the machine labels, fine-tunes and evaluates it, runs low-shot
probes, writes the dataset card and HTML report, and says where everything is. The
pipeline is the recipe ``silverlabel/recipes/demo.yaml``, run by ``silverlabel build``'s
runner; ``--keep`` keeps the outputs and reruns only the steps whose config or inputs changed.

    python -m silverlabel.demo --out demo-output
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def build_url_table(path: str, base_url: str, names: list[str], broken: list[str]) -> int:
    """Write the demo's URL table (COYO-like columns: id, url, text); returns its rows."""
    urls = [f"{base_url}/{n}" for n in names] + [f"{base_url}/{b}" for b in broken]
    captions = [f"a photo ({os.path.splitext(n)[0].replace('_', ' ')})" for n in names] + [None] * len(broken)
    table = pa.table({"id": pa.array(range(1000, 1000 + len(urls)), pa.int64()), "url": urls, "text": captions})
    pq.write_table(table, path)
    return len(urls)


def recipe_path() -> str:
    """The demo's recipe, ``silverlabel/recipes/demo.yaml`` inside the installed package."""
    return str(Path(__file__).resolve().parent / "recipes" / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    from silverlabel.cli import main as cli_main
    from silverlabel.pipeline import build, format_plan, load_recipe, plan

    ap = argparse.ArgumentParser(prog="python -m silverlabel.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-output", help="folder for the demo's outputs (recreated unless --keep)")
    ap.add_argument("--keep", action="store_true",
                    help="keep --out and rebuild only what changed (a second run does nothing)")
    ap.add_argument("--images", type=int, default=300, help="photo-like images to generate (300)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="ingest processes (all cores)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the demo recipe, as silverlabel build --set")
    args = ap.parse_args(argv)

    out = os.path.abspath(args.out)
    if os.path.isdir(out) and not args.keep:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    table = os.path.join(out, "urls.parquet")
    overrides = [f"steps.pool.workers={args.workers}", *args.overrides]
    print(f"demo: the pipeline is the recipe {recipe_path()}")
    with contextlib.ExitStack() as stack:
        recipe = load_recipe(recipe_path(), out=out, overrides=overrides)
        if not os.path.exists(table) or plan(recipe, only=["pool"])[0].action == "run":
            serve(stack, table, args.images)  # ingest runs: it needs the server (and maybe a new table)
        print(format_plan(plan(recipe)))
        build(recipe)
    pool, selection, trainset = (str(recipe.step(n).product) for n in ("pool", "selection", "trainset"))
    print()
    cli_main(["label", "--stats", pool])
    show_examples(pool)
    runs, report = os.path.join(out, "runs"), os.path.join(out, "report")
    print(f"\ndemo: done.\n  dataset:   {pool} (shards/*.tar, samples/*.parquet, labels/efficientnet_lite0/)\n"
          f"  selection: {selection} (selection/*.parquet, classes.json, report.json)\n"
          f"  trainset:  {trainset} (_info.json: timm.data.create_dataset('wds/demo', root=trainset))\n"
          f"  runs:      {runs} (pretrain/, finetune/: checkpoints, metrics.csv, tb/; eval and low-shot JSON)")
    print(f"  card:      {os.path.join(trainset, 'README.md')} (plots in {os.path.join(trainset, 'card')})\n"
          f"  report:    {os.path.join(report, 'index.html')} (open it in a browser; no server needed)\n"
          f"  again:     python -m silverlabel.demo --out {args.out} --keep   (rebuilds only what changed)")
    return 0


def serve(stack: contextlib.ExitStack, table: str, images: int) -> None:
    """Serve the bundled photos on loopback until ``stack`` closes; (re)write the URL table
    unless its URLs already point at this server (a kept table keeps its port when it is free)."""
    from silverlabel.demodata import ImageServer, photo_like_images, real_photos

    files: dict[str, tuple[bytes, str]] = {}
    for name, data in real_photos():
        files[name] = (data, "image/png" if name.endswith(".png") else "image/jpeg")
    for name, data in photo_like_images(images):
        files[name] = (data, "image/jpeg")
    broken = ["missing/404.jpg", "gone/also-missing.png"]
    old = pq.read_table(table, columns=["url"]).column(0)[0].as_py() if os.path.exists(table) else ""
    try:
        srv = stack.enter_context(ImageServer(files, port=urllib.parse.urlsplit(old).port or 0))
    except OSError:  # the kept table's port is taken: a new port, a new table
        srv = stack.enter_context(ImageServer(files))
    print(f"demo: serving {len(files)} images ({len(real_photos())} real scikit-image photos) on loopback")
    if not old.startswith(srv.base_url + "/"):
        n = build_url_table(table, srv.base_url, sorted(files), broken)
        print(f"demo: wrote URL table {table} ({n} rows)")


def show_examples(pool: str, names: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")) -> None:
    """Print the top-3 labels of a few of the real photos."""
    import glob

    from silverlabel.teachers.labelspace import get_label_space

    samples = pq.read_table(os.path.join(pool, "samples"), columns=["key", "url"]).to_pylist()
    by_key = {r["key"]: r["url"] for r in samples}
    files = sorted(glob.glob(os.path.join(pool, "labels", "efficientnet_lite0", "*.parquet")))
    space = get_label_space("in21k")
    print("\ndemo: top labels of some real photos")
    for f in files:
        for r in pq.read_table(f, columns=["key", "labels", "label_probs"]).to_pylist():
            url = by_key.get(r["key"], "")
            name = url.rsplit("/", 1)[-1].split(".")[0]
            if name in names:
                top = ", ".join(f"{space.lemma(i)} {p:.2f}" for i, p in zip(r["labels"][:3], r["label_probs"][:3]))
                print(f"  {name:<10} {top}")


if __name__ == "__main__":
    sys.exit(main())
