"""The ``silverlabel`` command: a thin layer that builds a stage's config and runs it.

A command's flags are generated from the fields of its config dataclasses
(:mod:`silverlabel.options`): a flag's name, help, choices and converter are declared on the
field, and a flag the user does not give leaves the field to its dataclass default, so
``silverlabel label DATASET`` and ``run_label(LabelConfig(DATASET))`` do the same thing.
What is left here: the examples of each command, the one-screen summaries, and the few
options that are not config fields (``--no-progress``, ``--stats``, ``--inspect``, ``--resume``,
and the global ``-v``/``-q``/``--log-level``/``--progress``, accepted before or after the
command).

Output: a command's result (its summary: counts, where the output is) goes to stdout; with
``-q`` only its first line. Diagnostics go through :mod:`logging` (:mod:`silverlabel.log`,
configured here and nowhere else) to stderr: warnings by default, ``-v`` info, ``-vv``
debug (worker processes too), ``-q`` errors only. Progress bars go to stderr when it is a
terminal (``--progress`` or ``SILVERLABEL_PROGRESS=1``: always; ``--no-progress``, ``-q``:
never), with a total and an ETA where the amount of work is known.

Bad input (a :class:`~silverlabel.errors.UserError`, a missing file, an argparse error) ends
with one line on stderr and exit code 2; anything else is a bug and keeps its traceback
(``SILVERLABEL_DEBUG=1`` shows the traceback of bad input too).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from silverlabel import __version__
from silverlabel.errors import UserError
from silverlabel.log import LEVELS, configure, level_from_flags, progress_wanted, stage_progress
from silverlabel.options import (LazyChoices, cli_meta, cpu_count, engine_field, is_nested, opt, positive_int,
                                 ray_address_field)

# ---------------------------------------------------------------------------------------
# flags from config fields


def _dest(f: dataclasses.Field, meta: dict[str, Any]) -> str:
    return f.name if meta["positional"] else meta["flag"].lstrip("-").replace("-", "_")


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(f: dataclasses.Field, meta: dict[str, Any]) -> str:
    shown = meta["default_help"]
    if shown is None and not any(f.default is x for x in (dataclasses.MISSING, None, False, ())):
        shown = _show(f.default)
    text = meta["help"]
    return f"{text} ({shown})".strip() if shown else text


def add_config_args(parser: argparse.ArgumentParser, cls: type, groups: dict[str | None, Any]) -> None:
    """Add a flag for every field of ``cls`` (and of its nested configs) that declares one,
    unless the command already has that flag (``eval`` shares flags between two configs)."""
    for f in dataclasses.fields(cls):
        if is_nested(f):
            add_config_args(parser, f.default_factory, groups)
            continue
        meta = cli_meta(f)
        dest = _dest(f, meta) if meta else None
        if meta is None or dest in groups["seen"]:
            continue
        groups["seen"].add(dest)
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        target = groups[meta["group"]]
        if meta["action"] == "teachers":
            _add_teacher_args(target)
            continue
        choices = meta["choices"]
        kw: dict[str, Any] = {"help": _help(f, meta), "metavar": meta["metavar"],
                              "choices": LazyChoices(choices) if callable(choices) else choices}
        if meta["positional"]:
            target.add_argument(dest, nargs=meta["nargs"], **kw)
            continue
        if meta["action"] in ("store_true", "store_false"):
            kw = {"help": kw["help"], "action": meta["action"]}
        else:
            kw.update(type=meta["type"], nargs=meta["nargs"], action=meta["action"], required=meta["required"])
        names = [meta["short"], meta["flag"]] if meta["short"] else [meta["flag"]]
        kw = {k: v for k, v in kw.items() if v is not None}
        target.add_argument(*names, dest=dest, default=argparse.SUPPRESS, **kw)


def config_from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """Build ``cls`` from the flags the user gave (``given`` overrides); the rest keep their
    dataclass defaults.

        >>> from silverlabel.stages.shard import ShardConfig
        >>> args = build_parser("shard").parse_args(["shard", "data/sel", "-o", "data/ts", "--shards", "train=8"])
        >>> cfg = config_from_args(ShardConfig, args)
        >>> cfg.shards, cfg.seed == ShardConfig("data/sel", "data/ts").seed
        ((('train', 8),), True)
    """
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given or not f.init:
            continue
        if is_nested(f):
            kw[f.name] = config_from_args(f.default_factory, args)
            continue
        meta = cli_meta(f)
        if meta is None:
            continue
        if meta["action"] == "teachers":
            kw[f.name] = _teacher_specs(args)
            continue
        dest = _dest(f, meta)
        if not hasattr(args, dest):
            if meta["auto_workers"]:
                workers = _auto_workers(args, meta["auto_workers"])
                if workers is not None:
                    kw[f.name] = workers
            continue
        value = getattr(args, dest)
        if isinstance(value, list):
            value = tuple(value)
        if meta["extend"]:
            value = tuple(dict.fromkeys(tuple(f.default) + tuple(value)))
        kw[f.name] = value
    return cls(**kw, **given)


def _auto_workers(args: argparse.Namespace, kind: str) -> int | None:
    """``--workers`` left out: 0 (the whole cluster) with ``--engine ray``; one process with a
    ``--device`` other than auto/cuda for a GPU stage; else the config's default."""
    if getattr(args, "engine", "local") == "ray":
        return 0
    if kind == "gpu" and getattr(args, "device", "auto") not in ("auto", "cuda"):
        return 1
    return None


# --teacher (repeatable) with its --checkpoint / --teacher-space / --activation: one declared
# converter for every stage that runs teachers


def _add_teacher_args(g: Any) -> None:
    from silverlabel.teachers.labelspace import space_names

    g.add_argument("--teacher", action="append", default=None,
                   help="efficientnet_lite0 (default) or timm:NAME; repeat for an ensemble (probabilities averaged, "
                   "embeddings concatenated)")
    g.add_argument("--checkpoint", action="append", default=None,
                   help="weights for the matching --teacher (safetensors or .pth, weights only); '-' for none")
    g.add_argument("--teacher-space", choices=LazyChoices(space_names), help="native label space of a timm teacher")
    g.add_argument("--activation", choices=["softmax", "sigmoid"],
                   help="softmax (single-label) or sigmoid (multi-label)")


def _teacher_specs(args: argparse.Namespace) -> tuple:
    from silverlabel.teachers import TeacherSpec

    names = args.teacher or ["efficientnet_lite0"]
    ckpts = args.checkpoint or []
    if len(ckpts) > len(names):
        raise UserError(f"{len(ckpts)} --checkpoint for {len(names)} --teacher")
    ckpts = [None if c in (None, "-") else c for c in ckpts] + [None] * (len(names) - len(ckpts))
    return tuple(TeacherSpec.parse(n, checkpoint=c, activation=args.activation, label_space=args.teacher_space)
                 for n, c in zip(names, ckpts))


@dataclasses.dataclass(frozen=True)
class SelectRun:
    """How ``select`` runs (arguments of :func:`~silverlabel.stages.select.run_select`, not
    part of its config: they do not change the selection)."""

    engine: str = engine_field()
    ray_address: str | None = ray_address_field()
    workers: int = opt(1, "units at once", type=positive_int, group="run", auto_workers="cpu",
                       default_help="default: 1; with --engine ray: the cluster's CPUs")


# ---------------------------------------------------------------------------------------
# the commands: examples, what runs, the summary


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_global_flags(p: argparse.ArgumentParser, top: bool) -> None:
    """``-v``/``-q``/``--log-level``/``--progress``: on the main parser (with defaults) and on
    every command's (defaults suppressed, so a flag given before the command is kept)."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=d(0),
                   help="say more on stderr: -v what the run decides (resumes, skips, passes), -vv debug")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="only errors and the result's first line; no progress bar")
    g.add_argument("--log-level", type=str.lower, choices=LEVELS, default=d(None), metavar="LEVEL",
                   help=f"{', '.join(LEVELS)} (default: warning, or $SILVERLABEL_LOG_LEVEL); overrides -v/-q")
    g.add_argument("--progress", action="store_true", default=d(False),
                   help="progress bars even when stderr is not a terminal")


def _want_progress(args: argparse.Namespace) -> bool:
    """A bar for this run: see :func:`silverlabel.log.progress_wanted`."""
    return progress_wanted(getattr(args, "no_progress", False), args.quiet, args.progress)


def _head(args: argparse.Namespace, text: str) -> None:
    """A summary's first line (the one ``-q`` keeps), below the progress bar."""
    print(text if args.quiet else f"\n{text}")


def _more(args: argparse.Namespace, text: str) -> None:
    """A summary's further lines (not with ``-q``)."""
    if not args.quiet:
        print(text)


def _shards_done(s: Any) -> str:
    return f"in {s.shards} shards ({s.shards_done_now} written now, {s.shards_skipped} already complete)"


def _footer(args: argparse.Namespace, s: Any, now: int, done: str, rate: float, unit: str, what: str, hint: str = "",
            where: str = "") -> None:
    """A summary's last lines: the throughput of the work done now (when there was some) and
    where the output is."""
    if now:
        _more(args, f"  throughput: {done} in {s.seconds:.1f} s = {rate:.1f} {unit}/s{where}")
    _more(args, f"  {what}: {_where(s.output)}{hint}")


def _where(path: str | os.PathLike) -> str:
    """Where an output lies, for a message: a URL as its public form, a path made absolute."""
    from silverlabel import fs

    return fs.public(str(path)) if fs.is_remote(path) else os.path.abspath(path)


def _with_progress(args: argparse.Namespace, stage: str, run: Callable[..., Any], cfg: Any, **kw: Any) -> Any:
    """``run(cfg, progress=...)`` with a bar (:func:`silverlabel.log.stage_progress`) to stderr."""
    bar = stage_progress(stage, _want_progress(args))
    try:
        return run(cfg, progress=bar, **kw)
    finally:
        bar.close()


def cmd_ingest(args: argparse.Namespace) -> int:
    from silverlabel.stages.ingest import IngestConfig, run_ingest

    s = _with_progress(args, "ingest", run_ingest, config_from_args(IngestConfig, args))
    total = sum(s.counts.values())
    _head(args, f"silverlabel ingest: {total} samples {_shards_done(s)}")
    width = max((len(k) for k in s.counts), default=7)
    for status, n in s.counts.items():
        _more(args, f"  {status:<{width}}  {n:>10}  {100 * n / max(1, total):5.1f}%")
    _footer(args, s, s.items_now, f"{s.items_now} inputs", s.images_per_second, "images", "dataset")
    return 0


def _label_extras(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stats", action="store_true", help="print the threshold table of existing labels and exit")
    _progress_flag(p)


def cmd_label(args: argparse.Namespace) -> int:
    from silverlabel.stages.label import LabelConfig, run_label

    if args.stats:
        return print_label_stats(args.dataset, getattr(args, "name", None))
    s = _with_progress(args, "label", run_label, config_from_args(LabelConfig, args))
    _head(args, f"silverlabel label: {s.rows} images labeled in {s.shards} files "
          f"({s.shards_done_now} written now), {s.decode_errors} decode errors{_missing_note(s.missing)}")
    _footer(args, s, s.images_now, f"{s.images_now} images", s.images_per_second, "images", "labels", where=f" on {s.device}")
    return 0


def _missing_note(missing: int) -> str:
    """The label summary's count of samples their tars do not hold (damaged shards)."""
    return (f", {missing} samples not labeled: missing from their damaged shards"
            if missing else "")


def print_label_stats(dataset: str, name: str | None) -> int:
    from silverlabel.dataset import Pool
    from silverlabel.stages.label import labels_counts, threshold_stats
    from silverlabel.teachers.labelspace import space_size

    ds = Pool(dataset)
    man = ds.read_manifest()
    done = sorted(man.get("labels", {}))
    if not done:
        raise UserError(f"{dataset}: no labels yet (run silverlabel label {dataset})")
    name = name or done[0]
    if name not in done:
        raise UserError(f"{dataset}: no labels named {name!r} (have: {', '.join(done)})")
    n_classes = space_size(man["labels"][name]["config"]["label_space"])
    files = ds.labels_files(name)  # a pool in a bucket too
    _rows, decode_errors, missing = labels_counts(files)
    rows = threshold_stats(files, num_classes=n_classes)
    print(f"labels/{name}: {rows[0]['images'] if rows else 0} images, {decode_errors} decode errors"
          f"{_missing_note(missing)}")
    print(f"{'threshold':>9}  {'labels/image':>12}  {'distinct labels':>15}  {'images with >=1':>15}")
    for r in rows:
        print(f"{r['threshold']:>9.1f}  {r['avg_labels_per_image']:>12.3f}  {r['distinct_labels']:>15}  "
              f"{100 * r['share_with_label']:>14.1f}%")
    return 0


def _classes_args(p: argparse.ArgumentParser) -> None:
    from silverlabel.teachers.labelspace import space_names

    p.add_argument("query", nargs="+", help="index, wnid (n02124075) or name")
    p.add_argument("--space", default="in21k", choices=LazyChoices(space_names), help="label space (in21k)")
    p.add_argument("--max", type=positive_int, default=10, help="most matches to show per query (10)")


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


def cmd_select(args: argparse.Namespace) -> int:
    from silverlabel.stages.select import SelectConfig, run_select

    run = config_from_args(SelectRun, args)
    s = _with_progress(args, "select", run_select, config_from_args(SelectConfig, args), **dataclasses.asdict(run))
    splits = ", ".join(f"{k} {v}" for k, v in s.splits.items()) or "nothing"
    print(f"silverlabel select: {s.rows} samples ({splits}) in {s.classes} classes, {s.seconds:.1f} s")
    for why, n in s.removed.items():
        _more(args, f"  removed {n:>10}  {why.replace('_', ' ')}")
    _more(args, f"  selection: {_where(s.output)}")
    if s.from_table:
        _more(args, f"  (no images yet: fetch them with  silverlabel ingest {s.output} -o DATASET)")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from silverlabel.stages.shard import ShardConfig, run_shard

    s = _with_progress(args, "shard", run_shard, config_from_args(ShardConfig, args))
    _head(args, f"silverlabel shard: {s.samples} samples {_shards_done(s)}")
    width = max((len(k) for k in s.splits), default=5)
    for split, info in s.splits.items():
        lengths = info["shard_lengths"]
        _more(args, f"  {split:<{width}}  {info['samples']:>10} samples  {info['shards']:>6} shards "
              f"({min(lengths)}-{max(lengths)} per shard)")
    _footer(args, s, s.samples_now, f"{s.samples_now} samples ({s.bytes_now / 1e6:.1f} MB)", s.samples_per_second, "samples",
            "training set", f"  (timm: --data-dir {s.output} --dataset wds/{s.name})")
    return 0


def _reinforce_extras(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inspect", action="store_true", help="print one sample of a reinforced training set and exit")
    p.add_argument("--key", help="with --inspect: the sample to show (default: the first)")
    _progress_flag(p)


def cmd_reinforce(args: argparse.Namespace) -> int:
    from silverlabel.stages.reinforce import ReinforceConfig, inspect_sample, run_reinforce

    split = getattr(args, "split", None)
    if args.inspect:
        print(inspect_sample(args.trainset, key=args.key, split=split[0] if split else None))
        return 0
    if not hasattr(args, "output"):
        raise UserError("reinforce needs -o OUT (or --inspect)")
    cfg = config_from_args(ReinforceConfig, args)
    s = _with_progress(args, "reinforce", run_reinforce, cfg)
    _head(args, f"silverlabel reinforce: {s.samples} samples x {s.augs_per_sample} augmentations {_shards_done(s)}, "
          f"top-{cfg.topk} in {s.label_space}")
    _more(args, f"  storage: {s.bytes_per_sample:.1f} bytes per sample, {s.bytes_per_aug:.1f} bytes per augmentation "
          f"({s.rnf_bytes / 1e6:.2f} MB of .rnf members)")
    _footer(args, s, s.augs_now, f"{s.augs_now} augmentations ({s.samples_now} samples)", s.augs_per_second, "augmentations",
            "training set", f"  (silverlabel train {s.output} --loss kd ...)", f" on {s.device}")
    return 0


def _train_extras(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    _progress_flag(p)


def cmd_train(args: argparse.Namespace) -> int:
    from silverlabel.stages.train import TrainConfig, run_train

    s = run_train(config_from_args(TrainConfig, args), resume=args.resume, progress=_want_progress(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "n/a"
    _head(args, f"silverlabel train: {s.steps} steps ({s.steps - s.start_step} now, {s.epochs:.2f} epochs), "
          f"final loss {loss}")
    _more(args, f"  throughput: {s.samples_per_second:.1f} samples/s over {s.seconds:.1f} s")
    _more(args, f"  checkpoint: {_where(s.checkpoint)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from silverlabel.stages.evaluate import EvalConfig, format_report, run_eval

    if hasattr(args, "lowshot"):
        from silverlabel.stages.lowshot import LowShotConfig, format_lowshot, run_lowshot

        lcfg = config_from_args(LowShotConfig, args)
        say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
        print(format_lowshot(run_lowshot(lcfg, log=say)))
        return 0
    report = _with_progress(args, "eval", run_eval, config_from_args(EvalConfig, args))
    print(format_report(report))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from silverlabel.stages.card import CardConfig, run_card

    s = _with_progress(args, "card", run_card, config_from_args(CardConfig, args))
    splits = ", ".join(f"{k} {v}" for k, v in s.splits.items())
    print(f"silverlabel card: {s.kind}, {s.samples} samples ({splits}) in {s.classes} classes, {s.seconds:.1f} s")
    _more(args, f"  card:   {_where(s.readme)}")
    if s.plots:
        _more(args, f"  plots:  {os.path.dirname(_where(s.plots[0]))} ({len(s.plots)})")
    if s.report:
        _more(args, f"  report: {_where(s.report)} ({s.thumbnails} thumbnails)")
    for note in s.notes:
        _more(args, f"  note: {note}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from silverlabel.verify import VerifyConfig, format_report, verify

    cfg = config_from_args(VerifyConfig, args)
    report = verify(cfg)
    print(json.dumps(report.to_json(), indent=2) if cfg.as_json else format_report(report))
    return 0 if report.ok else 1


# the examples each command's --help ends with

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

_EPILOG_LABEL = """\
examples:
  silverlabel label data/pool                      # default teacher, top-50 over in21k, GPU if present
  silverlabel label data/pool --limit 500          # a quick look at the first 500 images
  silverlabel label data/pool --teacher timm:vit_base_patch16_224 --checkpoint vit.safetensors
  silverlabel label data/pool --teacher efficientnet_lite0 --teacher timm:convnext_tiny --checkpoint - --checkpoint ct.pth
  silverlabel label --stats data/pool              # COYO's threshold table
"""

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

_EPILOG_SHARD = """\
examples:
  silverlabel shard data/sel -o data/trainset                 # 10000 samples per shard, seed 0
  silverlabel shard data/sel -o data/in12k --name imagenet12k --shards train=1024,validation=64
  silverlabel shard data/sel -o data/trainset --shards 16 --seed 1 --workers 8
  # train on it with timm (the folder is the root of wds/NAME):
  python train.py --data-dir data/trainset --dataset wds/NAME --train-split train --val-split validation
  # after a crash: run the same command again; finished shards are kept
"""

_EPILOG_REINFORCE = """\
examples:
  silverlabel reinforce train/in1k -o train/in1k-rnf --augs 10 --topk 10     # ImageNet+-style, GPU if present
  silverlabel reinforce train/in1k -o train/in1k-rnf --augs 30 --embeddings  # DataCompDR-style: + pre-logits
  silverlabel reinforce train/in1k -o rnf --teacher efficientnet_lite0 --teacher timm:convnext_tiny \\
      --checkpoint - --checkpoint ct.pth --mix both                         # an ensemble; mixup/cutmix pairs
  silverlabel reinforce --inspect train/in1k-rnf [--key KEY]                 # one sample's augmentations + top-k
  silverlabel train train/in1k-rnf -o runs/kd --loss kd --model resnet50     # distil without the teacher
"""

_EPILOG_TRAIN = """\
examples:
  silverlabel train train/in12k -o runs/vit-s --loss bce-multihot --steps 10000   # on the teacher's top-k labels
  silverlabel train train/in12k -o runs/vit-s --resume            # continues at the exact step
  torchrun --nproc-per-node 8 -m silverlabel.cli train train/in12k -o runs/vit-s ...   # DDP
  silverlabel train train/in1k -o runs/ft384 --init runs/vit-s/checkpoint-final.pt --img-size 384 --loss ce
  silverlabel train train/in1k-rnf -o runs/kd --loss kd --model resnet50          # distil from stored outputs
"""

_EPILOG_EVAL = """\
examples:
  silverlabel eval runs/ft384 --data train/in1k --split validation --real-labels real.json
  silverlabel eval runs/vit-s --data train/in1k --head-space in21k --target-space in1k   # a 21k head on 1k labels
  silverlabel eval runs/vit-s --data train/in1k --lowshot 0.01 0.1                    # probe + fine-tune
  silverlabel eval runs/vit-s --data train/in1k --lowshot 0.01 --lowshot-modes probe --ft-steps 2000
"""

_EPILOG_CARD = """\
examples:
  silverlabel card data/trainset                       # README.md + card/*.png in the training set
  silverlabel card data/trainset --html report/        # and a static HTML report (open report/index.html)
  silverlabel card sel/in12k --name "ImageNet-12k (silver)" --license cc-by-4.0
  silverlabel card data/pool -o cards/pool.md --no-plots   # the card of an ingested, labeled pool
"""


_EPILOG_VERIFY = """\
examples:
  silverlabel verify data/pool                # shards, samples tables, labels: sizes, md5s, counts, coverage
  silverlabel verify data/trainset --json     # a machine-readable report; exit code 1 when anything is wrong
  silverlabel verify runs/vit-s --sizes-only  # a run's checkpoints; --sizes-only skips the md5s
"""


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its texts, the configs its flags come from (a class, or ``module:Class``
    imported when the parser is built), extra flags, and what runs."""

    name: str
    help: str
    description: str
    run: Callable[[argparse.Namespace], int]
    configs: tuple[str | type, ...] = ()
    epilog: str | None = None
    extras: Callable[[argparse.ArgumentParser], None] | None = _progress_flag


COMMANDS = (
    Command("ingest", "URL tables, folders or tar shards -> WebDataset shards + samples table",
            "Fetch/read images, filter and resize them, and write WebDataset shards plus a samples table with one "
            "row per input (failures included). Resumable: rerun the same command.",
            cmd_ingest, ("silverlabel.stages.ingest:IngestConfig",), _EPILOG_INGEST),
    Command("label", "teacher top-k labels (COYO-Labeled-300M format)",
            "Run a teacher (or an ensemble) over a dataset's shards and write top-k class indices and probabilities "
            "per image, in the COYO-Labeled-300M schema. Resumable per shard.",
            cmd_label, ("silverlabel.stages.label:LabelConfig",), _EPILOG_LABEL, _label_extras),
    Command("select", "classes, splits, 1%%/10%% subsets, uid lists, de-duplication -> a selection",
            "Choose samples and classes from a dataset (or a bare COYO-Labeled / DataComp table) with DuckDB over "
            "parquet, and write a selection: parquet rows with key/id/uid/url/split/cls/class_name, classes.json "
            "and report.json.",
            cmd_select, ("silverlabel.stages.select:SelectConfig", SelectRun), _EPILOG_SELECT,
            None),
    Command("classes", "look up a class by index, wnid or name; show its WordNet ancestors",
            "Look up classes of a label space (in1k, in12k, in21k) by index, wnid or name, and show their WordNet "
            "3.0 ancestors.", cmd_classes,
            epilog="examples:\n  silverlabel classes 'egyptian cat'\n  silverlabel classes n02124075 --space in1k\n"
            "  silverlabel classes 285 --space in1k", extras=_classes_args),
    Command("shard", "selection -> pre-shuffled WebDataset shards + _info.json (timm, wids)",
            "Materialize a selection into new WebDataset shards: a global pre-shuffle, shard lengths differing by at "
            "most one per split, images copied without re-encoding, .cls and .json per sample, _info.json for timm's "
            "wds reader and a wids index per split. Resumable: rerun the same command.",
            cmd_shard, ("silverlabel.stages.shard:ShardConfig",), _EPILOG_SHARD),
    Command("reinforce", "K stored augmentations x teacher top-k (and embeddings) per sample, for --loss kd",
            "Write a reinforced copy of a training set: each sample keeps its members and gains {key}.rnf with K "
            "augmentations (crop box as fractions of the source, flip, RandAugment ops, optional mixup/cutmix "
            "partner) and the teacher's top-k probabilities (float16 + int32 indices) on each, optionally its "
            "pre-logits embedding. silverlabel train --loss kd replays a stored augmentation exactly. Resumable "
            "per shard.", cmd_reinforce, ("silverlabel.stages.reinforce:ReinforceConfig",), _EPILOG_REINFORCE,
            _reinforce_extras),
    Command("train", "train a timm model on a training set (silverlabel shard output)",
            "Train a timm model from scratch (or fine-tune with --init) on a training set: ce on the class, or "
            "bce-multihot / soft-topk on the teacher's top-k labels. Checkpoints RUN/checkpoint.pt; --resume "
            "continues at the exact step. Metrics in RUN/metrics.jsonl and RUN/metrics.csv. Under torchrun "
            "(WORLD_SIZE > 1) it trains with DDP.", cmd_train, ("silverlabel.stages.train:TrainConfig",),
            _EPILOG_TRAIN, _train_extras),
    Command("eval", "accuracy of a trained run on a split of a training set",
            "Evaluate a run's checkpoint (RUN/checkpoint-final.pt, else RUN/checkpoint.pt) on a split: top-1/top-5 "
            "on cls, per-class accuracy, ReaL-style accuracy with --real-labels. Writes RUN/eval-SPLIT.json (or "
            "--out) and prints a table.", cmd_eval,
            ("silverlabel.stages.evaluate:EvalConfig", "silverlabel.stages.lowshot:LowShotConfig"), _EPILOG_EVAL),
    Command("card", "dataset card (README.md), plots and an HTML report",
            "Write a Hugging Face-style dataset card (YAML front matter, structure, splits, creation from the "
            "lineage, COYO's threshold table) and PNG plots for a pool, selection or training set; with --html, a "
            "static report with thumbnails per class that opens from disk.",
            cmd_card, ("silverlabel.stages.card:CardConfig",), _EPILOG_CARD, None),
    Command("verify", "check a dataset or run against what was recorded: missing, corrupt, stale",
            "Check every unit of a pool, selection, training set or run against its commit records and manifest: "
            "files missing or changed (size, md5), units made from inputs that changed since, counts that do not "
            "add up, success rows without labels. Reads only. Exit code 0 when all is good, 1 when there are "
            "problems.", cmd_verify, ("silverlabel.verify:VerifyConfig",), _EPILOG_VERIFY, None),
)


def _import(ref: str | type) -> type:
    import importlib

    if isinstance(ref, type):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def add_command(sub: argparse._SubParsersAction, cmd: Command, flags: bool = True) -> argparse.ArgumentParser:
    """The subparser of ``cmd``; ``flags=False``: only its name and help (the modules of its
    configs are not imported)."""
    p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description, epilog=cmd.epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if not flags:
        return p
    groups: dict[str | None, Any] = {None: p, "seen": set()}
    for ref in cmd.configs:
        add_config_args(p, _import(ref), groups)
    if cmd.extras is not None:
        cmd.extras(p)
    p.set_defaults(func=cmd.run)
    return p


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command``, one whose other commands have no
    flags: running ``ingest`` does not import the training code (and torch)."""
    parser = argparse.ArgumentParser(
        prog="silverlabel",
        description="Turn pools of web images into machine-labeled, ImageNet-like pretraining datasets.",
    )
    parser.add_argument("--version", action="version", version=f"silverlabel {__version__}")
    _add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        add_command(sub, cmd, flags=command in (None, cmd.name))
    from silverlabel.pipeline import add_build_parser  # `silverlabel build RECIPE.yaml`

    add_build_parser(sub)
    for p in sub.choices.values():  # -v/-q/... after the command too
        _add_global_flags(p, top=False)
    return parser


#: errors that are bad input as they are; any other OSError only when it is a full disk or a
#: read-only output (:func:`silverlabel.dataset.storage_error`)
_BAD_INPUT = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _command_of(argv: Sequence[str]) -> str:
    """The command named in ``argv``: its first word that is neither a flag nor the value of
    ``--log-level``."""
    it = iter(argv)
    for a in it:
        if a == "--log-level":
            next(it, None)
        elif not a.startswith("-"):
            return a
    return ""


#: commands whose local engine runs a pool of CPU workers, and the module their workers run
_POOL_COMMANDS = {"ingest": "silverlabel.stages.ingest", "shard": "silverlabel.stages.shard"}


def _early_pool(command: str, argv: Sequence[str]) -> str | None:
    """The module the local engine's workers will run when ``command`` will start a pool of
    them (:data:`_POOL_COMMANDS`, ``--engine local``, more than one ``--workers``), else None.
    Only those two flags are looked at; anything wrong with them or the rest is the real
    parser's to report.

        >>> _early_pool("ingest", ["ingest", "urls.parquet", "-o", "pool", "--workers", "2"])
        'silverlabel.stages.ingest'
        >>> _early_pool("ingest", ["ingest", "urls.parquet", "--workers=1"]) is None
        True
    """
    module = _POOL_COMMANDS.get(command)
    if module is None or "-h" in argv or "--help" in argv:
        return None
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--engine", default="local")
    pre.add_argument("--workers", default=None)
    try:
        known, _ = pre.parse_known_args(argv)
        workers = int(known.workers) if known.workers is not None else cpu_count()
    except (argparse.ArgumentError, ValueError):
        return None
    return module if known.engine == "local" and workers > 1 else None


def _start_pool_early(command: str, argv: Sequence[str]) -> None:
    """Start the local engine's fork server now, before the command's own imports and
    planning, when it will run a pool (:func:`_early_pool`): the server's imports then
    overlap them (~0.14 s of a 2,000-image ingest on 2 cores)."""
    module = _early_pool(command, argv)
    if module is None:
        return
    from silverlabel.engine.local import start_forkserver

    try:
        start_forkserver(module)
    except UserError:  # a bad $SILVERLABEL_START_METHOD: the engine says so, in the command's words
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _start_pool_early(_command_of(argv), argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    try:
        configure(level_from_flags(args.verbose, args.quiet, args.log_level))
    except ValueError as e:  # a bad $SILVERLABEL_LOG_LEVEL
        parser.error(str(e))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    t0 = time.monotonic()
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except (UserError, OSError) as e:
        # bad input, a full disk or a read-only output: one line naming the file, row or flag.
        # Anything else is a bug and keeps its traceback; SILVERLABEL_DEBUG=1 shows the
        # traceback of these too.
        from silverlabel.dataset import storage_error

        shown = e if isinstance(e, _BAD_INPUT) else storage_error(e, getattr(args, "output", None))
        if shown is None or os.environ.get("SILVERLABEL_DEBUG", "") not in ("", "0"):
            raise
        print(f"silverlabel {args.command}: error: {shown}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsilverlabel {args.command}: interrupted after {time.monotonic() - t0:.0f} s; "
              "run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
