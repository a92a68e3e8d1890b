"""``make demo``: the pipeline end to end on bundled data, served over real HTTP.

Starts a loopback HTTP server with scikit-image's real photos and a few hundred
photo-like images made from them (plus a few broken links, so the samples table shows
failures too), writes a URL table, ingests it, labels it with the default teacher
(EfficientNet-Lite0, real ImageNet weights; GPU if present), prints COYO's threshold
table and the top labels of a few real photos, selects the largest classes with a
validation split (near-duplicates removed), writes pre-shuffled timm-ready shards, and
says where everything is.

    python -m silverlabel.demo --out demo-output
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def build_url_table(path: str, base_url: str, names: list[str], broken: list[str]) -> int:
    """Write the demo's URL table (COYO-like columns: id, url, text); returns its rows."""
    urls = [f"{base_url}/{n}" for n in names] + [f"{base_url}/{b}" for b in broken]
    captions = [f"a photo ({os.path.splitext(n)[0].replace('_', ' ')})" for n in names] + [None] * len(broken)
    table = pa.table({"id": pa.array(range(1000, 1000 + len(urls)), pa.int64()), "url": urls, "text": captions})
    pq.write_table(table, path)
    return len(urls)


def main(argv: list[str] | None = None) -> int:
    from silverlabel.cli import main as cli_main
    from silverlabel.demodata import ImageServer, photo_like_images, real_photos

    ap = argparse.ArgumentParser(prog="python -m silverlabel.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-output", help="folder for the demo's outputs (recreated)")
    ap.add_argument("--images", type=int, default=300, help="photo-like images to generate (300)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    files: dict[str, tuple[bytes, str]] = {}
    for name, data in real_photos():
        files[name] = (data, "image/png" if name.endswith(".png") else "image/jpeg")
    for name, data in photo_like_images(args.images):
        files[name] = (data, "image/jpeg")
    broken = ["missing/404.jpg", "gone/also-missing.png"]
    print(f"demo: serving {len(files)} images ({len(real_photos())} real scikit-image photos) on loopback")
    with ImageServer(files) as srv:
        table = os.path.join(out, "urls.parquet")
        n = build_url_table(table, srv.base_url.rstrip("/"), sorted(files), broken)
        print(f"demo: wrote URL table {table} ({n} rows)")
        rc = cli_main(["ingest", table, "-o", os.path.join(out, "pool"), "--samples-per-shard", "100",
                       "--workers", str(args.workers), "--retries", "0"])
    if rc != 0:
        return rc
    pool = os.path.join(out, "pool")
    print("\ndemo: labeling with the default teacher (top-50 over the 21,841 ImageNet-21k classes)")
    rc = cli_main(["label", pool])
    if rc != 0:
        return rc
    print()
    cli_main(["label", "--stats", pool])
    show_examples(pool)
    selection = os.path.join(out, "selection")
    trainset = os.path.join(out, "trainset")
    print("\ndemo: selecting the 8 largest teacher classes (2 validation images each), near-duplicates removed")
    rc = cli_main(["select", pool, "-o", selection, "--top-classes", "8", "--val-per-class", "2",
                   "--min-train-per-class", "3", "--dedupe", "phash:4"])
    if rc != 0:
        return rc
    print("\ndemo: writing pre-shuffled, timm-ready shards")
    rc = cli_main(["shard", selection, "-o", trainset, "--samples-per-shard", "40", "--name", "demo"])
    if rc != 0:
        return rc
    runs = os.path.join(out, "runs")
    rc = train_and_evaluate(cli_main, trainset, runs)
    if rc != 0:
        return rc
    report = os.path.join(out, "report")
    print("\ndemo: writing the training set's dataset card (README.md, plots) and the HTML report")
    rc = cli_main(["card", trainset, "--html", report])
    if rc != 0:
        return rc
    print(f"\ndemo: done.\n  dataset:   {pool} (shards/*.tar, samples/*.parquet, labels/efficientnet_lite0/)\n"
          f"  selection: {selection} (selection/*.parquet, classes.json, report.json)\n"
          f"  trainset:  {trainset} (_info.json: timm.data.create_dataset('wds/demo', root=trainset))\n"
          f"  runs:      {runs} (pretrain/, finetune/: checkpoints, metrics.csv, tb/; eval and low-shot JSON)")
    print(f"  card:      {os.path.join(trainset, 'README.md')} (plots in {os.path.join(trainset, 'card')})\n"
          f"  report:    {os.path.join(report, 'index.html')} (open it in a browser; no server needed)")
    return 0


def train_and_evaluate(cli_main, trainset: str, runs: str) -> int:
    """COYO-ViT in miniature: pretrain a ViT with sigmoid BCE on the teacher's multi-hot top-k
    (ImageNet-21k space), fine-tune it with a new head on the selected classes at a higher
    resolution (position embeddings resampled), evaluate top-1/top-5, then low-shot probes."""
    pre, ft = os.path.join(runs, "pretrain"), os.path.join(runs, "finetune")
    print("\ndemo: pretraining a tiny ViT on the machine labels (sigmoid BCE, multi-hot top-k over 21,841 classes)")
    rc = cli_main(["train", trainset, "-o", pre, "--model", "vit_tiny_patch16_224", "--img-size", "64",
                   "--batch-size", "32", "--steps", "20", "--lr", "1e-3", "--warmup-steps", "2",
                   "--loss", "bce-multihot", "--log-every", "5", "--no-progress"])
    if rc != 0:
        return rc
    print("\ndemo: fine-tuning it on the selected classes at 96 px (new head, position embeddings resampled)")
    rc = cli_main(["train", trainset, "-o", ft, "--model", "vit_tiny_patch16_224", "--img-size", "96",
                   "--batch-size", "32", "--steps", "10", "--lr", "5e-4", "--warmup-steps", "1", "--loss", "ce",
                   "--init", os.path.join(pre, "checkpoint-final.pt"), "--log-every", "5", "--no-progress"])
    if rc != 0:
        return rc
    print("\ndemo: evaluating the fine-tuned model on the validation split")
    rc = cli_main(["eval", ft, "--data", trainset, "--no-progress"])
    if rc != 0:
        return rc
    print("\ndemo: low-shot evaluation of the pretrained model (linear probe on 10% / 25% of the labels)")
    return cli_main(["eval", pre, "--data", trainset, "--lowshot", "0.1", "0.25", "--lowshot-modes", "probe",
                     "--no-progress"])


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
