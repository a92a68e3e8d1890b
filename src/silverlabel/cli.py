"""The ``silverlabel`` command: a thin layer that builds a stage's config and runs it.

Bad input ends with one line on stderr naming the file, row or flag, and exit code 2;
no traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence

from silverlabel import __version__
from silverlabel.errors import UserError

_EPILOG_INGEST = """\
examples:
  # a URL table (parquet/csv/tsv/jsonl, .gz ok; COYO-700M and DataComp metadata work as is)
  silverlabel ingest urls.parquet -o data/pool
  # DataComp metadata, keeping two columns, 8 processes
  silverlabel ingest metadata/ -o data/dc --keep-cols clip_b32_similarity_score,face_bboxes --workers 8
  # an ImageFolder tree (class = folder name) and existing WebDataset shards
  silverlabel ingest train/ -o data/in1k
  silverlabel ingest 'shards/imagenet12k-train-{0000..1023}.tar' -o data/in12k
  # after a crash: run the same command again; to re-try only failed downloads:
  silverlabel ingest urls.parquet -o data/pool --retry-failed
"""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """``20MB`` -> 20971520 (binary units; plain numbers are bytes)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20MB, 512KB, 1000000)")
    unit = (m.group(2) or "b").lower()[0]
    return int(float(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit])


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_engine_args(g) -> None:
    """``--engine local|ray`` and ``--ray-address`` (every shard-parallel stage)."""
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine; ray: Ray tasks/actors on a cluster "
                   "(pip install 'silverlabel[ray]')")
    g.add_argument("--ray-address", metavar="auto|HOST:PORT|ray://HOST:PORT", default=None,
                   help="with --engine ray: the cluster to join (default: RAY_ADDRESS, else the cluster this "
                   "machine belongs to, else a new local one; auto: an existing one or fail)")


def _engine_workers(args: argparse.Namespace, local_default: int) -> int:
    """--workers as given; else the local default, or 0 (= the whole cluster) with --engine ray."""
    if args.workers is not None:
        return args.workers
    return 0 if args.engine == "ray" else local_default


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    from silverlabel.sources.http import FetchConfig

    d = FetchConfig()
    p = sub.add_parser(
        "ingest",
        help="URL tables, folders or tar shards -> WebDataset shards + samples table",
        description="Fetch/read images, filter and resize them, and write WebDataset shards plus a samples "
        "table with one row per input (failures included). Resumable: rerun the same command.",
        epilog=_EPILOG_INGEST,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="URL table file/folder, image folder, or tar shards")
    p.add_argument("-o", "--output", required=True, metavar="DATASET", help="dataset directory to write")
    p.add_argument("--name", default="data", help="shard name prefix (default: data)")
    p.add_argument("--samples-per-shard", type=_positive_int, default=10_000, metavar="N", help="default: 10000")
    p.add_argument("--source-kind", choices=["table", "folder", "tar"], help="do not guess the source kind")
    g = p.add_argument_group("URL table columns")
    g.add_argument("--url-col", default="url")
    g.add_argument("--caption-col", default=None, help="default: caption, else text (COYO/DataComp)")
    g.add_argument("--uid-col", default="uid")
    g.add_argument("--id-col", default="id")
    g.add_argument("--keep-cols", type=_csv_list, default=(), metavar="A,B", help="extra columns to carry through")
    g.add_argument("--folder-labels", choices=["auto", "on", "off"], default="auto",
                   help="ImageFolder class labels from sub-folder names (default: auto)")
    g = p.add_argument_group("images")
    g.add_argument("--min-side", type=_positive_int, default=48, help="drop images whose shorter side is smaller (48)")
    g.add_argument("--max-shortest-edge", type=int, default=600,
                   help="downscale so the shortest edge is at most this; 0 keeps the size (600)")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (90)")
    g.add_argument("--max-pixels", type=_positive_int, default=100_000_000, help="decompression-bomb cap (1e8)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--timeout", type=float, default=d.timeout, help=f"total deadline per request, s ({d.timeout:g})")
    g.add_argument("--max-bytes", type=parse_size, default=d.max_bytes, help="byte cap per image (20MB)")
    g.add_argument("--retries", type=int, default=d.retries, help=f"retries for errors, 429, 5xx ({d.retries})")
    g.add_argument("--max-redirects", type=int, default=d.max_redirects)
    g.add_argument("--per-host", type=_positive_int, default=d.per_host, help=f"connections per host ({d.per_host})")
    g.add_argument("--user-agent", default=d.user_agent)
    g.add_argument("--robots-optout", type=_csv_list, default=(), metavar="D1,D2",
                   help="X-Robots-Tag directives to honour besides noai,noimageai (e.g. noindex)")
    g.add_argument("--ignore-robots", action="store_true", help="do not honour X-Robots-Tag (not recommended)")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=_positive_int, default=None,
                   help="processes (default: cores; with --engine ray: the cluster's CPUs)")
    g.add_argument("--threads", type=_positive_int, default=64, help="concurrent fetches per process (64)")
    _add_engine_args(g)
    g.add_argument("--retry-failed", action="store_true", help="re-attempt failed downloads of finished shards")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    from silverlabel.imageops import ImageConfig
    from silverlabel.sources import SourceOptions
    from silverlabel.sources.http import FetchConfig
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    base = FetchConfig()
    fetch = FetchConfig(
        timeout=args.timeout,
        max_bytes=args.max_bytes,
        retries=args.retries,
        max_redirects=args.max_redirects,
        per_host=args.per_host,
        user_agent=args.user_agent,
        robots_optout=tuple(dict.fromkeys(base.robots_optout + args.robots_optout)),
        respect_robots=not args.ignore_robots,
        verify_tls=not args.insecure,
    )
    cfg = IngestConfig(
        sources=tuple(args.sources),
        output=args.output,
        name=args.name,
        samples_per_shard=args.samples_per_shard,
        image=ImageConfig(
            min_side=args.min_side,
            max_shortest_edge=args.max_shortest_edge or None,
            quality=args.quality,
            max_pixels=args.max_pixels,
        ),
        fetch=fetch,
        source_options=SourceOptions(
            url_col=args.url_col,
            caption_col=args.caption_col,
            uid_col=args.uid_col,
            id_col=args.id_col,
            keep_cols=args.keep_cols,
            folder_labels=args.folder_labels,
            kind=args.source_kind,
        ),
        workers=_engine_workers(args, os.cpu_count() or 1),
        threads=args.threads,
        retry_failed=args.retry_failed,
        engine=args.engine,
        ray_address=args.ray_address,
    )
    bar = _Progress(enabled=not args.no_progress)
    try:
        summary = run_ingest(cfg, progress=bar.update)
    finally:
        bar.close()
    print_ingest_summary(summary)
    return 0


_EPILOG_LABEL = """\
examples:
  silverlabel label data/pool                      # default teacher, top-50 over in21k, GPU if present
  silverlabel label data/pool --limit 500          # a quick look at the first 500 images
  silverlabel label data/pool --teacher timm:vit_base_patch16_224 --checkpoint vit.safetensors
  silverlabel label data/pool --teacher efficientnet_lite0 --teacher timm:convnext_tiny --checkpoint - --checkpoint ct.pth
  silverlabel label --stats data/pool              # COYO's threshold table
"""


def _add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="teacher top-k labels (COYO-Labeled-300M format)",
        description="Run a teacher (or an ensemble) over a dataset's shards and write top-k class indices and "
        "probabilities per image, in the COYO-Labeled-300M schema. Resumable per shard.",
        epilog=_EPILOG_LABEL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATASET")
    p.add_argument("--teacher", action="append", default=None,
                   help="efficientnet_lite0 (default) or timm:NAME; repeat for an ensemble (probabilities averaged)")
    p.add_argument("--checkpoint", action="append", default=None,
                   help="weights for the matching --teacher (safetensors or .pth, weights only); '-' for none")
    p.add_argument("--teacher-space", choices=["in1k", "in12k", "in21k"], help="native label space of a timm teacher")
    p.add_argument("--activation", choices=["softmax", "sigmoid"], help="softmax (single-label) or sigmoid (multi-label)")
    p.add_argument("--label-space", default="in21k", choices=["in1k", "in12k", "in21k"], help="output space (in21k)")
    p.add_argument("--topk", type=_positive_int, default=50, help="labels kept per image (50)")
    p.add_argument("--name", dest="output_name", help="folder under labels/ (default: the teacher name)")
    p.add_argument("--img-size", type=_positive_int, help="override the teacher's input size")
    p.add_argument("--crop-pct", type=float, help="override the teacher's crop_pct")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear"], help="override the teacher's interpolation")
    p.add_argument("--limit", type=_positive_int, help="label only the first N images (a quick look)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1")
    p.add_argument("--batch-size", type=int, default=0, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher (GPU)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="GPU autocast precision (fp16: matches the fp32 CPU path best)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes (default: one per GPU, 1 on CPU; with --engine ray: one actor per cluster GPU)")
    _add_engine_args(p)
    p.add_argument("--decode-procs", type=int, default=-1,
                   help="GPU JPEG-decode processes per GPU worker (default: 3; 0 decodes in the labeling process)")
    p.add_argument("--stats", action="store_true", help="print the threshold table of existing labels and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> int:
    from silverlabel.stages.label import LabelConfig, run_label
    from silverlabel.teachers import TeacherSpec

    if args.stats:
        return print_label_stats(args.dataset, args.output_name)
    names = args.teacher or ["efficientnet_lite0"]
    ckpts = args.checkpoint or []
    if len(ckpts) > len(names):
        raise UserError(f"{len(ckpts)} --checkpoint for {len(names)} --teacher")
    ckpts = [None if c in (None, "-") else c for c in ckpts] + [None] * (len(names) - len(ckpts))
    specs = tuple(TeacherSpec.parse(n, checkpoint=c, activation=args.activation, label_space=args.teacher_space)
                  for n, c in zip(names, ckpts))
    workers = args.workers
    if workers is None and args.engine == "ray":
        workers = 0
    if workers is None:
        workers = 1
        if args.device in ("auto", "cuda"):
            import torch

            workers = max(1, torch.cuda.device_count())
    cfg = LabelConfig(
        dataset=args.dataset, teachers=specs, label_space=args.label_space, topk=args.topk,
        output_name=args.output_name, img_size=args.img_size, crop_pct=args.crop_pct,
        interpolation=args.interpolation, limit=args.limit, device=args.device, batch_size=args.batch_size,
        compile=args.compile, workers=workers, precision=args.precision, decode_procs=args.decode_procs,
        engine=args.engine, ray_address=args.ray_address,
    )
    bar = _Progress(enabled=not args.no_progress, desc="label")
    try:
        s = run_label(cfg, progress=bar.update)
    finally:
        bar.close()
    print(f"\nsilverlabel label: {s.rows} images labeled in {s.shards} files "
          f"({s.shards_done_now} written now), {s.decode_errors} decode errors")
    if s.images_now:
        print(f"  throughput: {s.images_now} images in {s.seconds:.1f} s = {s.images_per_second:.1f} images/s on {s.device}")
    print(f"  labels: {os.path.abspath(s.output)}")
    return 0


def print_label_stats(dataset: str, name: str | None) -> int:
    from silverlabel.dataset import Dataset
    from silverlabel.stages.label import threshold_stats

    ds = Dataset(dataset)
    man = ds.read_manifest()
    done = sorted(man.get("labels", {}))
    if not done:
        raise UserError(f"{dataset}: no labels yet (run silverlabel label {dataset})")
    name = name or done[0]
    if name not in done:
        raise UserError(f"{dataset}: no labels named {name!r} (have: {', '.join(done)})")
    from silverlabel.teachers.labelspace import get_label_space

    n_classes = len(get_label_space(man["labels"][name]["config"]["label_space"]))
    files = sorted((ds.root / "labels" / name).glob("*.parquet"))
    rows = threshold_stats(files, num_classes=n_classes)
    print(f"labels/{name}: {rows[0]['images'] if rows else 0} images")
    print(f"{'threshold':>9}  {'labels/image':>12}  {'distinct labels':>15}  {'images with >=1':>15}")
    for r in rows:
        print(f"{r['threshold']:>9.1f}  {r['avg_labels_per_image']:>12.3f}  {r['distinct_labels']:>15}  "
              f"{100 * r['share_with_label']:>14.1f}%")
    return 0


def _add_classes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classes",
        help="look up a class by index, wnid or name; show its WordNet ancestors",
        description="Look up classes of a label space (in1k, in12k, in21k) by index, wnid or name, "
        "and show their WordNet 3.0 ancestors.",
        epilog="examples:\n  silverlabel classes 'egyptian cat'\n  silverlabel classes n02124075 --space in1k\n"
        "  silverlabel classes 285 --space in1k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="+", help="index, wnid (n02124075) or name")
    p.add_argument("--space", default="in21k", choices=["in1k", "in12k", "in21k"], help="label space (in21k)")
    p.add_argument("--max", type=_positive_int, default=10, help="most matches to show per query (10)")
    p.set_defaults(func=cmd_classes)


def cmd_classes(args: argparse.Namespace) -> int:
    from silverlabel.teachers.hierarchy import load_hierarchy
    from silverlabel.teachers.labelspace import get_label_space

    space = get_label_space(args.space)
    hier = load_hierarchy()
    found_any = False
    for query in args.query:
        hits = space.find(query)
        if not hits:
            print(f"{query!r}: no class in {args.space}")
            continue
        found_any = True
        for i in hits[: args.max]:
            wnid = space.wnids[i]
            print(f"{args.space}[{i}] {wnid}  {space.lemma(i)}")
            if wnid in hier:
                if hier.gloss(wnid):
                    print(f"    {hier.gloss(wnid)}")
                chain = [f"{a} {hier.lemma(a)}" for a in hier.path_to_root(wnid)[1:]]
                print(f"    depth {hier.depth(wnid)}; ancestors: " + " > ".join(chain))
        if len(hits) > args.max:
            print(f"    ... {len(hits) - args.max} more (--max)")
    return 0 if found_any else 1


_EPILOG_SELECT = """\
examples:
  # imagenet-12k: top 11,821 classes by count, 40 validation images each, >= 400 left for training
  silverlabel select data/pool -o sel/in12k --top-classes 11821 --val-per-class 40 --min-train-per-class 400
  # label-balanced 1% subset of the training split (imagenet2012_subset)
  silverlabel select data/in1k --label source -o sel/in1k-1pct --fraction 0.01 --balanced
  silverlabel select data/in1k --label source -o sel/simclr-1pct --keys-file 1percent.txt
  # the published COYO-Labeled-300M metadata, no images: threshold and map to in1k
  silverlabel select coyo-labeled-300m/ -o sel/coyo --min-prob 0.3 --label-space in1k
  # DataComp-style uid subset, de-duplicated and decontaminated against an eval set
  silverlabel select data/pool -o sel/dc --uids uids.npy --dedupe phash:8 --exclude-near data/eval
"""


def _add_select(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="classes, splits, 1%%/10%% subsets, uid lists, de-duplication -> a selection",
        description="Choose samples and classes from a dataset (or a bare COYO-Labeled / DataComp table) with "
        "DuckDB over parquet, and write a selection: parquet rows with key/id/uid/url/split/cls/class_name, "
        "classes.json and report.json.",
        epilog=_EPILOG_SELECT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="DATASET_OR_TABLE")
    p.add_argument("-o", "--output", required=True, metavar="SELECTION")
    g = p.add_argument_group("labels")
    g.add_argument("--labels", dest="labels_name", help="which labels/NAME of the dataset (default: the first)")
    g.add_argument("--label", choices=["auto", "top1", "source", "none"], default="auto",
                   help="top1: teacher's top-1 class; source: ImageFolder/.cls label (auto: top1 if labeled)")
    g.add_argument("--min-prob", type=float, help="keep samples whose top-1 probability is >= P")
    g.add_argument("--multi-label", action="store_true", help="with --min-prob: keep every label >= P")
    g.add_argument("--label-space", choices=["in1k", "in12k", "in21k"], help="remap the labels to this space")
    g.add_argument("--rollup-depth", type=int, help="roll labels up to their WordNet ancestor at this depth")
    g.add_argument("--rollup-to", metavar="FILE", help="roll labels up to the nearest ancestor listed (wnids)")
    g = p.add_argument_group("classes and splits")
    g.add_argument("--top-classes", type=_positive_int, metavar="N", help="keep the N largest classes")
    g.add_argument("--val-per-class", type=int, default=0, metavar="V", help="validation samples per class")
    g.add_argument("--min-train-per-class", type=int, default=0, metavar="T",
                   help="keep classes that still have T training samples after V validation ones")
    g.add_argument("--fraction", type=float, help="subset of the training split (with --balanced)")
    g.add_argument("--balanced", action="store_true", help="equal per class, remainder +1 for random classes")
    g.add_argument("--keys-file", help="an official list (keys, file names or uids, one per line)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("uids and duplicates")
    g.add_argument("--uids", help="DataComp uids.npy (u8,u8) or uids.txt (32 hex a line)")
    g.add_argument("--dedupe", help="exact (sha256) or phash:D (pHash within Hamming distance D)")
    g.add_argument("--exclude-near", metavar="REF", help="drop samples near a reference dataset or hash list")
    g.add_argument("--max-distance", type=int, default=8, help="distance for --exclude-near (8)")
    g = p.add_argument_group("run")
    g.add_argument("--memory-limit", default="4GB", help="DuckDB memory limit (4GB); spills beyond it")
    g.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1)
    _add_engine_args(g)
    g.add_argument("--workers", type=_positive_int, default=None,
                   help="with --engine ray: tasks at once (default: the cluster's CPUs)")
    p.set_defaults(func=cmd_select)


def cmd_select(args: argparse.Namespace) -> int:
    from silverlabel.stages.select import SelectConfig, run_select

    cfg = SelectConfig(
        source=args.source, output=args.output, labels_name=args.labels_name, label=args.label,
        min_prob=args.min_prob, multi_label=args.multi_label, label_space=args.label_space,
        rollup_depth=args.rollup_depth, rollup_to=args.rollup_to, top_classes=args.top_classes,
        val_per_class=args.val_per_class, min_train_per_class=args.min_train_per_class, fraction=args.fraction,
        balanced=args.balanced, keys_file=args.keys_file, uids=args.uids, dedupe=args.dedupe,
        exclude_near=args.exclude_near, max_distance=args.max_distance, seed=args.seed,
        memory_limit=args.memory_limit, threads=args.threads,
    )
    if args.engine == "ray":  # passes over the label shards (the rules that allow it; others say so)
        from silverlabel.stages.select_sharded import run_select_sharded

        s = run_select_sharded(cfg, engine="ray", workers=_engine_workers(args, 1), ray_address=args.ray_address)
    else:
        s = run_select(cfg)
    splits = ", ".join(f"{k} {v}" for k, v in s.splits.items()) or "nothing"
    print(f"silverlabel select: {s.rows} samples ({splits}) in {s.classes} classes, {s.seconds:.1f} s")
    for why, n in s.removed.items():
        print(f"  removed {n:>10}  {why.replace('_', ' ')}")
    print(f"  selection: {os.path.abspath(s.output)}")
    if s.from_table:
        print(f"  (no images yet: fetch them with  silverlabel ingest {s.output} -o DATASET)")
    return 0


_EPILOG_SHARD = """\
examples:
  silverlabel shard data/sel -o data/trainset                 # 10000 samples per shard, seed 0
  silverlabel shard data/sel -o data/in12k --name imagenet12k --shards train=1024,validation=64
  silverlabel shard data/sel -o data/trainset --shards 16 --seed 1 --workers 8
  # train on it with timm (the folder is the root of wds/NAME):
  python train.py --data-dir data/trainset --dataset wds/NAME --train-split train --val-split validation
  # after a crash: run the same command again; finished shards are kept
"""


def _shard_counts(text: str) -> int | dict[str, int]:
    """``16`` (every split) or ``train=1024,validation=64``."""
    if "=" not in text:
        return _positive_int(text)
    out: dict[str, int] = {}
    for part in _csv_list(text):
        split, sep, n = part.partition("=")
        if not sep or not split.strip():
            raise argparse.ArgumentTypeError(f"not SPLIT=N: {part!r}")
        out[split.strip()] = _positive_int(n.strip())
    return out


def _add_shard(sub: argparse._SubParsersAction) -> None:
    from silverlabel.stages.shard import DEFAULT_TEMPLATE

    p = sub.add_parser(
        "shard",
        help="selection -> pre-shuffled WebDataset shards + _info.json (timm, wids)",
        description="Materialize a selection into new WebDataset shards: a global pre-shuffle, shard lengths "
        "differing by at most one per split, images copied without re-encoding, .cls and .json per sample, "
        "_info.json for timm's wds reader and a wids index per split. Resumable: rerun the same command.",
        epilog=_EPILOG_SHARD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("selection", metavar="SELECTION", help="selection folder (silverlabel select)")
    p.add_argument("-o", "--output", required=True, metavar="TRAINSET", help="folder to write the shards to")
    p.add_argument("--seed", type=int, default=0, help="seed of the global pre-shuffle (0)")
    p.add_argument("--shards", type=_shard_counts, metavar="N|SPLIT=N,...",
                   help="shards per split: N for every split, or per split (the others use --samples-per-shard)")
    p.add_argument("--samples-per-shard", type=_positive_int, metavar="M",
                   help="ceil(n/M) shards per split of n samples (default: 10000)")
    p.add_argument("--name", help="dataset name (default: the selection folder's name)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"shard file names (default: {DEFAULT_TEMPLATE})")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="processes (default: cores; with --engine ray: the cluster's CPUs)")
    _add_engine_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_shard)


def cmd_shard(args: argparse.Namespace) -> int:
    from silverlabel.stages.shard import ShardConfig, run_shard

    cfg = ShardConfig(
        selection=args.selection,
        output=args.output,
        seed=args.seed,
        shards=args.shards,
        samples_per_shard=args.samples_per_shard,
        name=args.name,
        template=args.template,
        workers=_engine_workers(args, os.cpu_count() or 1),
        engine=args.engine,
        ray_address=args.ray_address,
    )
    bar = _Progress(enabled=not args.no_progress, desc="shard")
    try:
        s = run_shard(cfg, progress=bar.update)
    finally:
        bar.close()
    print(f"\nsilverlabel shard: {s.samples} samples in {s.shards} shards ({s.shards_done_now} written now, "
          f"{s.shards_skipped} already complete)")
    width = max((len(k) for k in s.splits), default=5)
    for split, info in s.splits.items():
        lengths = info["shard_lengths"]
        print(f"  {split:<{width}}  {info['samples']:>10} samples  {info['shards']:>6} shards "
              f"({min(lengths)}-{max(lengths)} per shard)")
    if s.samples_now:
        print(f"  throughput: {s.samples_now} samples ({s.bytes_now / 1e6:.1f} MB) in {s.seconds:.1f} s "
              f"= {s.samples_per_second:.1f} samples/s")
    print(f"  training set: {os.path.abspath(s.output)}  (timm: --data-dir {s.output} --dataset wds/{s.name})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a timm model on a training set (silverlabel shard output)",
        description="Train a timm model from scratch (or fine-tune with --init) on a training set: ce on the "
        "class, or bce-multihot / soft-topk on the teacher's top-k labels. Checkpoints RUN/checkpoint.pt; "
        "--resume continues at the exact step. Metrics in RUN/metrics.jsonl and RUN/metrics.csv. "
        "Under torchrun (WORLD_SIZE > 1) it trains with DDP.",
    )
    p.add_argument("trainset", metavar="TRAINSET", help="training set folder (silverlabel shard)")
    p.add_argument("-o", "--output", required=True, metavar="RUN", help="run folder (checkpoints, metrics)")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (vit_small_patch16_224)")
    p.add_argument("--img-size", type=_positive_int, default=224, help="input size (224)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size per rank and micro-step (64)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (default: --epochs worth)")
    p.add_argument("--epochs", type=_positive_int, default=1, help="epochs when --steps is not given (1)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (0)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (0.05)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip; 0 = off (1.0)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    p.add_argument("--loss", choices=("ce", "bce-multihot", "soft-topk", "kd"), default="ce",
                   help="kd: distil from the stored teacher outputs of a silverlabel reinforce output (ce)")
    p.add_argument("--label-threshold", type=float, help="bce-multihot: only labels with prob >= T")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="ce / soft-topk label smoothing (0)")
    p.add_argument("--label-space-classes", type=_positive_int,
                   help="head size for bce-multihot/soft-topk (default: from classes.json's label_space)")
    p.add_argument("--kd-aug", choices=("random", "sequential"), default="random",
                   help="kd: which stored augmentation a sample replays: random per epoch, or epoch %% K (random)")
    p.add_argument("--p-reinforced", type=float, default=1.0,
                   help="kd: share of samples on a stored augmentation; the rest are plain samples (1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument("--accum-steps", type=_positive_int, default=1, help="gradient accumulation micro-steps (1)")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights with this decay")
    p.add_argument("--ckpt-every", type=_positive_int, default=100, help="checkpoint every N steps (100)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="metrics row every N steps (10)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events to RUN/tb")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes (0)")
    p.add_argument("--init", metavar="CKPT", help="fine-tune from this checkpoint (new head / pos-embed resampled)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from silverlabel.stages.train import TrainConfig, run_train

    cfg = TrainConfig(
        trainset=args.trainset, output=args.output, model=args.model, img_size=args.img_size,
        batch_size=args.batch_size, steps=args.steps, epochs=args.epochs, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip if args.grad_clip and args.grad_clip > 0 else None,
        optimizer=args.optimizer, schedule=args.schedule, loss=args.loss, label_threshold=args.label_threshold,
        label_smoothing=args.label_smoothing, label_space_classes=args.label_space_classes, seed=args.seed,
        device=args.device, accum_steps=args.accum_steps, ema_decay=args.ema_decay, ckpt_every=args.ckpt_every,
        log_every=args.log_every, num_workers=args.workers, init=args.init, tensorboard=not args.no_tensorboard,
        kd_aug=args.kd_aug, p_reinforced=args.p_reinforced,
    )
    s = run_train(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "n/a"
    print(f"\nsilverlabel train: {s.steps} steps ({s.steps - s.start_step} now, {s.epochs:.2f} epochs), "
          f"final loss {loss}")
    print(f"  throughput: {s.samples_per_second:.1f} samples/s over {s.seconds:.1f} s")
    print(f"  checkpoint: {os.path.abspath(s.checkpoint)}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy of a trained run on a split of a training set",
        description="Evaluate a run's checkpoint (RUN/checkpoint-final.pt, else RUN/checkpoint.pt) on a split: "
        "top-1/top-5 on cls, per-class accuracy, ReaL-style accuracy with --real-labels. Writes "
        "RUN/eval-SPLIT.json (or --out) and prints a table.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (silverlabel train -o) or a checkpoint file")
    p.add_argument("--data", required=True, metavar="TRAINSET", help="training set folder (silverlabel shard)")
    p.add_argument("--split", default="validation", help="split to evaluate (validation)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size (64)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights when the checkpoint has them")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument("--real-labels", metavar="FILE",
                   help="JSON list of lists (split order) or {key: [classes]}: ReaL-style multi-label accuracy")
    p.add_argument("--head-space", metavar="SPACE", help="label space of the model's head (e.g. in21k)")
    p.add_argument("--target-space", metavar="SPACE", help="label space of the labels (e.g. in1k)")
    p.add_argument("--out", metavar="FILE", help="JSON report (default RUN/eval-SPLIT.json)")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("low-shot (imagenet2012_subset protocol)")
    g.add_argument("--lowshot", type=float, nargs="+", metavar="F",
                   help="instead of evaluating the head: label-balanced subsets of these fractions of --train-split "
                   "(0.01 0.1 = ImageNet's 1%%/10%%), a linear probe on frozen features and/or a short fine-tune on "
                   "each, accuracy on the whole --split; writes RUN/lowshot/lowshot.json (or --out DIR)")
    g.add_argument("--lowshot-modes", nargs="+", choices=("probe", "finetune"), default=["probe", "finetune"],
                   help="probe, finetune or both (both)")
    g.add_argument("--train-split", default="train", help="split the subsets are drawn from (train)")
    g.add_argument("--seed", type=int, default=0, help="subset draw seed, as select --seed (0)")
    g.add_argument("--ft-steps", type=_positive_int, default=500, help="fine-tuning steps per subset (500)")
    g.add_argument("--ft-lr", type=float, default=1e-4, help="fine-tuning peak learning rate (1e-4)")
    g.add_argument("--ft-batch-size", type=_positive_int, help="fine-tuning batch size (default --batch-size)")
    g.add_argument("--img-size", type=_positive_int, help="input size (default: the run's)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from silverlabel.stages.evaluate import EvalConfig, format_report, run_eval

    if args.lowshot:
        from silverlabel.stages.lowshot import LowShotConfig, format_lowshot, run_lowshot

        lcfg = LowShotConfig(run=args.run, trainset=args.data, fractions=tuple(args.lowshot),
                             modes=tuple(args.lowshot_modes), train_split=args.train_split, val_split=args.split,
                             seed=args.seed, batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                             ema=args.ema, img_size=args.img_size, ft_steps=args.ft_steps, ft_lr=args.ft_lr,
                             ft_batch_size=args.ft_batch_size, out=args.out)
        print(format_lowshot(run_lowshot(lcfg, log=lambda m: print(m, file=sys.stderr))))
        return 0
    cfg = EvalConfig(run=args.run, trainset=args.data, split=args.split, batch_size=args.batch_size, ema=args.ema,
                     device=args.device, real_labels=args.real_labels, head_space=args.head_space,
                     target_space=args.target_space, out=args.out, num_workers=args.workers)
    bar = None
    log = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="img", desc="eval", dynamic_ncols=True)

        def log(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
    try:
        report = run_eval(cfg, log=log)
    finally:
        if bar is not None:
            bar.close()
    print(format_report(report))
    return 0


_EPILOG_CARD = """\
examples:
  silverlabel card data/trainset                       # README.md + card/*.png in the training set
  silverlabel card data/trainset --html report/        # and a static HTML report (open report/index.html)
  silverlabel card sel/in12k --name "ImageNet-12k (silver)" --license cc-by-4.0
  silverlabel card data/pool -o cards/pool.md --no-plots   # the card of an ingested, labeled pool
"""


def _add_card(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card",
        help="dataset card (README.md), plots and an HTML report",
        description="Write a Hugging Face-style dataset card (YAML front matter, structure, splits, creation from "
        "the lineage, COYO's threshold table) and PNG plots for a pool, selection or training set; with --html, "
        "a static report with thumbnails per class that opens from disk.",
        epilog=_EPILOG_CARD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", metavar="DATASET", help="ingested pool, selection or training set")
    p.add_argument("-o", "--output", metavar="README", help="card path (default DATASET/README.md); plots go next to it")
    p.add_argument("--html", metavar="DIR", help="also write the HTML report into DIR (DIR/index.html)")
    p.add_argument("--name", dest="pretty_name", help="pretty_name of the card (default: the dataset's name)")
    p.add_argument("--license", default="other", help="license id for the front matter (default: other)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--per-class", type=int, default=8, metavar="K", help="thumbnails per class in the report (8)")
    p.add_argument("--max-classes", type=int, default=10_000, metavar="N", help="classes shown, largest first (10000)")
    p.add_argument("--least-confident", type=int, default=48, metavar="N", help="least confident samples shown (48)")
    p.add_argument("--thumb-size", type=int, default=96, metavar="PX", help="thumbnail size (96)")
    p.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1)
    p.set_defaults(func=cmd_card)


def cmd_card(args: argparse.Namespace) -> int:
    from silverlabel.stages.card import CardConfig, run_card

    cfg = CardConfig(dataset=args.dataset, output=args.output, html=args.html, plots=not args.no_plots,
                     pretty_name=args.pretty_name, license=args.license, per_class=args.per_class,
                     max_classes=args.max_classes, least_confident=args.least_confident, thumb_size=args.thumb_size,
                     threads=args.threads)
    s = run_card(cfg)
    splits = ", ".join(f"{k} {v}" for k, v in s.splits.items())
    print(f"silverlabel card: {s.kind}, {s.samples} samples ({splits}) in {s.classes} classes, {s.seconds:.1f} s")
    print(f"  card:   {os.path.abspath(s.readme)}")
    if s.plots:
        print(f"  plots:  {os.path.dirname(os.path.abspath(s.plots[0]))} ({len(s.plots)})")
    if s.report:
        print(f"  report: {os.path.abspath(s.report)} ({s.thumbnails} thumbnails)")
    for note in s.notes:
        print(f"  note: {note}")
    return 0


class _Progress:
    """tqdm bar showing images/s and the success rate."""

    def __init__(self, enabled: bool, desc: str = "ingest"):
        self.bar = None
        self.enabled = enabled
        self.desc = desc
        self.done = self.ok = 0

    def update(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        if self.enabled and self.bar is None:  # created on first progress: errors print no empty bar
            from tqdm import tqdm

            self.bar = tqdm(unit="img", desc=self.desc, dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(f"success {100 * self.ok / max(1, self.done):.1f}%", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_ingest_summary(s) -> None:
    total = sum(s.counts.values())
    print(f"\nsilverlabel ingest: {total} samples in {s.shards} shards ({s.shards_done_now} written now, "
          f"{s.shards_skipped} already complete)")
    width = max((len(k) for k in s.counts), default=7)
    for status, n in s.counts.items():
        print(f"  {status:<{width}}  {n:>10}  {100 * n / max(1, total):5.1f}%")
    if s.items_now:
        print(f"  throughput: {s.items_now} inputs in {s.seconds:.1f} s = {s.images_per_second:.1f} images/s")
    print(f"  dataset: {os.path.abspath(s.output)}")


_EPILOG_REINFORCE = """\
examples:
  silverlabel reinforce train/in1k -o train/in1k-rnf --augs 10 --topk 10     # ImageNet+-style, GPU if present
  silverlabel reinforce train/in1k -o train/in1k-rnf --augs 30 --embeddings  # DataCompDR-style: + pre-logits
  silverlabel reinforce train/in1k -o rnf --teacher efficientnet_lite0 --teacher timm:convnext_tiny \\
      --checkpoint - --checkpoint ct.pth --mix both                         # an ensemble; mixup/cutmix pairs
  silverlabel reinforce --inspect train/in1k-rnf [--key KEY]                 # one sample's augmentations + top-k
  silverlabel train train/in1k-rnf -o runs/kd --loss kd --model resnet50     # distil without the teacher
"""


def _pair(text: str) -> tuple[float, float]:
    parts = _csv_list(text)
    try:
        a, b = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIN,MAX: {text!r}") from None
    return a, b


def _add_reinforce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reinforce",
        help="K stored augmentations x teacher top-k (and embeddings) per sample, for --loss kd",
        description="Write a reinforced copy of a training set: each sample keeps its members and gains {key}.rnf "
        "with K augmentations (crop box as fractions of the source, flip, RandAugment ops, optional mixup/cutmix "
        "partner) and the teacher's top-k probabilities (float16 + int32 indices) on each, optionally its "
        "pre-logits embedding. silverlabel train --loss kd replays a stored augmentation exactly. Resumable per shard.",
        epilog=_EPILOG_REINFORCE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trainset", metavar="TRAINSET",
                   help="training set (silverlabel shard), or with --inspect a reinforced one")
    p.add_argument("-o", "--output", metavar="OUT", help="folder for the reinforced training set")
    p.add_argument("--augs", type=_positive_int, default=10, help="augmentations stored per sample, K (10)")
    p.add_argument("--topk", type=_positive_int, default=10, help="teacher probabilities kept per augmentation (10)")
    p.add_argument("--embeddings", action="store_true", help="also store the teacher's pre-logits embedding (float16)")
    p.add_argument("--teacher", action="append", default=None,
                   help="efficientnet_lite0 (default) or timm:NAME; repeat for an ensemble (probabilities averaged, "
                   "embeddings concatenated)")
    p.add_argument("--checkpoint", action="append", default=None,
                   help="weights for the matching --teacher; '-' for none")
    p.add_argument("--teacher-space", choices=["in1k", "in12k", "in21k"], help="native label space of a timm teacher")
    p.add_argument("--label-space", choices=["in1k", "in12k", "in21k"],
                   help="space of the stored indices (default: the first teacher's own)")
    p.add_argument("--split", action="append", default=None, help="split to reinforce (repeatable; default train); "
                   "the others are copied")
    p.add_argument("--seed", type=int, default=0, help="augmentations are drawn from (seed, key) (0)")
    p.add_argument("--scale", type=_pair, default=(0.08, 1.0), metavar="MIN,MAX", help="crop area range (0.08,1)")
    p.add_argument("--ratio", type=_pair, default=(3 / 4, 4 / 3), metavar="MIN,MAX", help="crop aspect range (3/4,4/3)")
    p.add_argument("--hflip", type=float, default=0.5, help="flip probability (0.5)")
    p.add_argument("--ra-ops", type=int, default=2, help="RandAugment ops per augmentation; 0 = none (2)")
    p.add_argument("--ra-magnitude", type=float, default=9.0, help="RandAugment magnitude, 0-10 (9)")
    p.add_argument("--mix", choices=["none", "mixup", "cutmix", "both"], default="none",
                   help="mix each augmentation with another sample of the shard (none)")
    p.add_argument("--mix-prob", type=float, default=1.0, help="share of augmentations mixed, with --mix (1.0)")
    p.add_argument("--img-size", type=_positive_int, help="teacher input size (default: the teacher's)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1")
    p.add_argument("--batch-size", type=int, default=0, help="augmented images per teacher forward (256 GPU, 32 CPU)")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16", help="GPU autocast precision")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: one per GPU, 1 on CPU)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="replay threads per process, with --replay-procs 0 (default: cores/workers)")
    p.add_argument("--replay-procs", type=int, default=-1, metavar="N",
                   help="replay processes per worker (Pillow holds the GIL: threads top out near one core); "
                   "0 = replay on --threads threads; default: 0 on CPU, min(16, cores/workers - 1) on a GPU")
    _add_engine_args(p)
    p.add_argument("--inspect", action="store_true", help="print one sample of a reinforced training set and exit")
    p.add_argument("--key", help="with --inspect: the sample to show (default: the first)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reinforce)


def cmd_reinforce(args: argparse.Namespace) -> int:
    from silverlabel.augment import AugPolicy
    from silverlabel.stages.reinforce import ReinforceConfig, inspect_sample, run_reinforce
    from silverlabel.teachers import TeacherSpec

    if args.inspect:
        print(inspect_sample(args.trainset, key=args.key, split=args.split[0] if args.split else None))
        return 0
    if not args.output:
        raise UserError("reinforce needs -o OUT (or --inspect)")
    names = args.teacher or ["efficientnet_lite0"]
    ckpts = args.checkpoint or []
    if len(ckpts) > len(names):
        raise UserError(f"{len(ckpts)} --checkpoint for {len(names)} --teacher")
    ckpts = [None if c in (None, "-") else c for c in ckpts] + [None] * (len(names) - len(ckpts))
    specs = tuple(TeacherSpec.parse(n, checkpoint=c, label_space=args.teacher_space) for n, c in zip(names, ckpts))
    workers = args.workers
    if workers is None and args.engine == "ray":
        workers = 0
    if workers is None:
        workers = 1
        if args.device in ("auto", "cuda"):
            import torch

            workers = max(1, torch.cuda.device_count())
    policy = AugPolicy(scale=args.scale, ratio=args.ratio, hflip=args.hflip, ra_ops=args.ra_ops,
                       ra_magnitude=args.ra_magnitude, mix=args.mix, mix_prob=args.mix_prob)
    cfg = ReinforceConfig(
        trainset=args.trainset, output=args.output, teachers=specs, label_space=args.label_space, augs=args.augs,
        topk=args.topk, embeddings=args.embeddings, splits=tuple(args.split or ("train",)), seed=args.seed,
        policy=policy, img_size=args.img_size, device=args.device, batch_size=args.batch_size,
        precision=args.precision, workers=workers,
        threads=args.threads or max(1, (os.cpu_count() or 1) // max(1, workers)), replay_procs=args.replay_procs,
        engine=args.engine, ray_address=args.ray_address,
    )
    bar = _Progress(enabled=not args.no_progress, desc="reinforce")
    try:
        s = run_reinforce(cfg, progress=bar.update)
    finally:
        bar.close()
    print(f"\nsilverlabel reinforce: {s.samples} samples x {s.augs_per_sample} augmentations in {s.shards} shards "
          f"({s.shards_done_now} written now, {s.shards_skipped} already complete), top-{cfg.topk} in {s.label_space}")
    print(f"  storage: {s.bytes_per_sample:.1f} bytes per sample, {s.bytes_per_aug:.1f} bytes per augmentation "
          f"({s.rnf_bytes / 1e6:.2f} MB of .rnf members)")
    if s.augs_now:
        print(f"  throughput: {s.augs_now} augmentations ({s.samples_now} samples) in {s.seconds:.1f} s = "
              f"{s.augs_per_second:.1f} augmentations/s on {s.device}")
    print(f"  training set: {os.path.abspath(s.output)}  (silverlabel train {s.output} --loss kd ...)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silverlabel",
        description="Turn pools of web images into machine-labeled, ImageNet-like pretraining datasets.",
    )
    parser.add_argument("--version", action="version", version=f"silverlabel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ingest(sub)
    _add_label(sub)
    _add_select(sub)
    _add_classes(sub)
    _add_shard(sub)
    _add_reinforce(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_card(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    t0 = time.monotonic()
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # bad input: one line naming the file, row or flag. Anything else is a bug and keeps
        # its traceback; SILVERLABEL_DEBUG=1 shows the traceback of these too.
        if os.environ.get("SILVERLABEL_DEBUG", "") not in ("", "0"):
            raise
        print(f"silverlabel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"\nsilverlabel {args.command}: interrupted after {time.monotonic() - t0:.0f} s; "
              "run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
