"""``silverlabel label``: teacher top-k labels in the COYO-Labeled-300M format.

For every ingest shard ``shards/{name}-{i}.tar`` this writes
``labels/{teacher}/{name}-{i}.parquet``: one row per image that decoded, with the top-k
class indices (most probable first) in the output label space (default: the 21,841
ImageNet-21k fall11 synsets in sorted-wnid order) and their float32 probabilities, plus
id, url, imagehash, width, height and key — COYO-Labeled-300M's schema plus ``key``.
Samples whose ingest failed are skipped; images that fail to decode here get no row and
are counted (``silverlabel.decode_errors`` in the file's metadata and the summary), and so
are the successful samples of the samples table whose image the tar does not hold (a
truncated or damaged shard: ``silverlabel.missing``): no sample is lost without a count.
Each labels table is committed by ``labels/{name}/.done/{shard}.json``, bound to the md5 of
its shard's tar and samples table: a shard that changed since (``ingest --retry-failed``)
is labeled again, the others are skipped.

    >>> from silverlabel.stages.label import LABELS_SCHEMA
    >>> LABELS_SCHEMA.field("labels").type
    ListType(list<item: int32>)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from silverlabel import __version__
from silverlabel.dataset import (Dataset, Pool, dataset_identity, display, drop_local, fetch_local, local_target,
                                 make_identity, map_ordered, named_teachers, parquet_source, records_digest)
from silverlabel.devices import worker_device
from silverlabel.engine import Engine, Report
from silverlabel.errors import UserError
from silverlabel.options import (cpu_count, device_field, engine_field, gpu_count, opt, positive_int, precision_field,
                                 ray_address_field)
from silverlabel.stage import BaseStage, Commit, StageRun, file_identity, run_stage
from silverlabel.formats.labels import CLASSES_UNIT, write_classes
from silverlabel.formats.tables import write_parquet_atomic
from silverlabel.teachers import TeacherSpec
from silverlabel.teachers.labelspace import space_names

LABELS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("url", pa.string()),
        ("imagehash", pa.string()),
        ("labels", pa.list_(pa.int32())),
        ("label_probs", pa.list_(pa.float32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("key", pa.string()),
    ]
)
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
DECODES = ("auto", "gpu", "host", "both")  # label --decode


@dataclass(frozen=True)
class LabelConfig:
    """Everything ``label`` needs; ``runtime`` fields change speed, not the output."""

    dataset: str = opt(positional=True, metavar="DATASET")
    teachers: tuple[TeacherSpec, ...] = opt((TeacherSpec("efficientnet_lite0"),), flag="--teacher",
                                            action="teachers")
    label_space: str = opt("in21k", "output space", choices=space_names)
    topk: int = opt(50, "labels kept per image", type=positive_int)
    output_name: str | None = opt(None, "folder under labels/", flag="--name",
                                  default_help="default: the teacher name")  # teacher slug(s)
    img_size: int | None = opt(None, "override the teacher's input size", type=positive_int)
    crop_pct: float | None = opt(None, "override the teacher's crop_pct", type=float)
    interpolation: str | None = opt(None, "override the teacher's interpolation", choices=("bicubic", "bilinear"))
    limit: int | None = opt(None, "label only the first N images (a quick look)", type=positive_int)
    # runtime
    device: str = device_field()
    batch_size: int = opt(0, "", type=int, default_help="default: 256 on GPU, 16 on CPU")
    precision: str = precision_field("GPU autocast precision (fp16: matches the fp32 CPU path best)")
    decode: str = opt("auto", "on a GPU, where images are decoded: gpu (hardware JPEG engines, then nvJPEG, then "
                      "Pillow), host (Pillow's pixels in --host-procs processes, JPEGs by libjpeg-turbo: "
                      "the CPU path's pixels, reproducible run to run; the engines decoded the bottom blocks of "
                      "some images differently between runs on the H200, see BENCHMARKS.md), both "
                      "(--host-share of the batches on the host, the rest on the GPU, side by side) or auto "
                      "(host when the teacher's GFLOPs per image times --host-procs reach 1,000, as ViT-L/16's "
                      "with 8 or more processes, else gpu; logged)",
                      choices=DECODES)
    host_procs: int = opt(-1, "processes decoding images with --decode host or both on a GPU (0: threads in the "
                          "labeling process with host, the GPU alone with both)", type=int,
                          default_help="default: cores per worker minus 2")
    host_share: float = opt(0.5, "with --decode both, the share of batches decoded on the host", type=float)
    gpu_decode_threads: int = 4
    decode_procs: int = opt(-1, "nvJPEG decode processes per GPU worker, used only on GPUs without hardware "
                            "JPEG engines (with engines, decoding stays in the labeling process)", type=int,
                            default_help="default: 3; 0 decodes in the labeling process")
    compile: bool = opt(False, "torch.compile the teacher (GPU)", action="store_true")
    reserve_sms: int = opt(0, "SMs kept from the teacher for JPEG decode and resize (a CUDA green context; "
                           "GPU; measured no gain end to end on an H200, see BENCHMARKS.md)", type=int)
    workers: int = opt(default_factory=gpu_count, help="processes", type=positive_int, auto_workers="gpu",
                       default_help="default: one per GPU, 1 on CPU; with --engine ray: one actor per cluster GPU")
    decode_threads: int = field(default_factory=cpu_count)
    engine: str = engine_field()  # local | ray (a pool of actors that keep the teacher loaded)
    ray_address: str | None = ray_address_field()  # None (this machine's cluster), auto, ray://host:port

    def __post_init__(self) -> None:
        if not self.teachers:
            raise UserError("label needs at least one --teacher")
        if self.topk < 1:
            raise UserError(f"--topk must be >= 1, got {self.topk}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.limit}")
        if self.decode not in DECODES:
            raise UserError(f"--decode must be one of {', '.join(DECODES)}, not {self.decode!r}")
        if not 0 <= self.host_share <= 1:
            raise UserError(f"--host-share must be in 0..1, got {self.host_share}")

    @property
    def name(self) -> str:
        if self.output_name:
            return self.output_name
        return "+".join(t.slug for t in self.teachers) if len(self.teachers) > 1 else self.teachers[0].slug

    def published_config(self) -> dict[str, Any]:
        """``output_config()`` as the manifest and the labels tables publish it: a teacher's
        checkpoint file by its name and content digest, not its path."""
        d = self.output_config()
        return {**d, "teachers": named_teachers(d["teachers"])}

    def output_config(self) -> dict[str, Any]:
        return {
            "teachers": [{"name": t.name, "checkpoint": t.checkpoint, "activation": t.activation,
                          "label_space": t.label_space} for t in self.teachers],
            "label_space": self.label_space,
            "topk": self.topk,
            "img_size": self.img_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "precision": self.precision,
        }


@dataclass
class LabelUnit:
    shard: int
    tar: str
    samples: str
    output: str
    limit: int | None = None
    commit: Commit | None = None  # written last: the shard is labeled
    published: str = ""  # the config as the table's metadata names it (LabelConfig.published_config)


@dataclass
class LabelResult:
    shard: int
    rows: int
    decode_errors: int
    seconds: float
    missing: int = 0  # successful samples whose image the tar does not hold (damaged shard)


@dataclass
class LabelSummary:
    output: str
    rows: int
    decode_errors: int
    shards: int
    shards_done_now: int
    images_now: int
    seconds: float
    device: str
    missing: int = 0  # successful samples whose image their tar does not hold (damaged shards)

    @property
    def images_per_second(self) -> float:
        return self.images_now / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------
# the unit function

_LABELER_CACHE: dict[Any, Any] = {}


def get_labeler(cfg: LabelConfig):
    """The process's Labeler for ``cfg`` (teachers load once per worker, not per shard)."""
    from silverlabel.inference import Labeler
    from silverlabel.teachers import create_teacher

    device = worker_device(cfg.device)
    key = (cfg.teachers, cfg.label_space, cfg.topk, device, cfg.compile, cfg.img_size, cfg.crop_pct, cfg.interpolation,
           cfg.precision, cfg.gpu_decode_threads, cfg.decode_procs, cfg.reserve_sms, cfg.decode, cfg.host_procs,
           cfg.host_share)
    if key not in _LABELER_CACHE:
        close_labelers()
        procs = cfg.decode_procs if cfg.decode_procs >= 0 else (3 if device.startswith("cuda") else 0)
        teachers = [create_teacher(t) for t in cfg.teachers]
        overrides = {"input_size": (3, cfg.img_size, cfg.img_size) if cfg.img_size else None,
                     "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}
        _LABELER_CACHE[key] = Labeler(teachers, cfg.label_space, cfg.topk, device=device, compile=cfg.compile,
                                      decode_threads=cfg.decode_threads, overrides=overrides,
                                      precision=cfg.precision, gpu_decode_threads=cfg.gpu_decode_threads,
                                      decode_procs=procs,
                                      reserve_sms=cfg.reserve_sms, host_decode=cfg.decode == "host",
                                      host_procs=host_procs(cfg),
                                      host_share=cfg.host_share if cfg.decode == "both" else 0.0,
                                      auto_decode=cfg.decode == "auto")
    return _LABELER_CACHE[key]


def close_labelers() -> None:
    """Close and forget this process's cached Labeler (its decode processes and ring)."""
    for old in _LABELER_CACHE.values():
        old.close()
    _LABELER_CACHE.clear()


def host_procs(cfg: LabelConfig) -> int:
    """``cfg.host_procs``, with -1 (auto) resolved: the cores of one worker but two (the
    labeling process's own threads), or 0 (threads) where that leaves fewer than 2."""
    if cfg.host_procs >= 0:
        return cfg.host_procs
    n = cpu_count() // max(1, cfg.workers) - 2
    return n if n >= 2 else 0


def _read_batches(tar_path: str, wanted: dict[str, Any], batch_size: int, limit: int | None,
                  report: Report) -> Iterator[tuple[list[str], str, list[tuple[int, int]]]]:
    """Batches of (keys, tar, member locations) for the wanted keys, in tar order.

    Only the index is read here; whoever decodes reads the bytes (sequentially)."""
    from silverlabel.formats.wds import iter_tar_samples

    keys: list[str] = []
    locs: list[tuple[int, int]] = []
    n = 0
    for s in iter_tar_samples(tar_path):
        if s.key not in wanted:
            continue
        ext = s.image_ext()
        if ext is None:
            continue
        keys.append(s.key)
        locs.append(s.members[ext])
        n += 1
        if len(keys) == batch_size:
            yield keys, tar_path, locs
            report(len(keys), len(keys))
            keys, locs = [], []
        if limit is not None and n >= limit:
            break
    if keys:
        yield keys, tar_path, locs
        report(len(keys), len(keys))


def _list_array(values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=dtype))


def label_shard(unit: LabelUnit, cfg: LabelConfig, report: Report | None = None) -> LabelResult:
    """Label one shard and write its labels parquet atomically."""
    t0 = time.monotonic()
    report = report or (lambda d, s: None)
    labeler = get_labeler(cfg)
    samples = pq.ParquetFile(parquet_source(unit.samples)).read(
        columns=["key", "id", "url", "imagehash", "width", "height", "status"])
    samples = samples.filter(pc.equal(samples["status"], "success"))
    meta = {r["key"]: r for r in samples.to_pylist()}
    expected = list(meta)[: unit.limit]  # in tar order: what a whole tar would give
    batch = cfg.batch_size or (256 if labeler.device.type == "cuda" else 16)
    keys_all: list[str] = []
    idx_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    errors: list[tuple[str, str]] = []
    # a pool at a URL: the tar is read whole by the labeler anyway, so it is fetched once into
    # this process's staging folder (a cache, dropped after the shard)
    tar = fetch_local(unit.tar)
    try:
        # each image's stored size, for the host decode's layout (the samples table has them)
        sizes = {k: (r["height"], r["width"]) for k, r in meta.items()} \
            if labeler.host_decoder is not None and all(r["height"] and r["width"] for r in meta.values()) else None
        for keys, idx, vals, failed in labeler.run(_read_batches(str(tar), meta, batch, unit.limit, report), sizes):
            keys_all.extend(keys)
            idx_parts.append(idx)
            val_parts.append(vals)
            errors.extend(failed)
    finally:
        drop_local(unit.tar)
    k = cfg.topk
    idx = np.concatenate(idx_parts) if idx_parts else np.zeros((0, k), np.int32)
    vals = np.concatenate(val_parts) if val_parts else np.zeros((0, k), np.float32)
    order = sorted(range(len(keys_all)), key=keys_all.__getitem__)  # tar order: keys increase
    keys_all = [keys_all[i] for i in order]
    idx, vals = idx[order], vals[order]
    rows = [meta[key] for key in keys_all]
    seen = set(keys_all).union(key for key, _e in errors)
    missing = [key for key in expected if key not in seen]
    table = pa.Table.from_arrays(
        [
            pa.array([r["id"] for r in rows], pa.int64()),
            pa.array([r["url"] for r in rows], pa.string()),
            pa.array([r["imagehash"] for r in rows], pa.string()),
            _list_array(idx.astype(np.int32), pa.int32()),
            _list_array(vals.astype(np.float32), pa.float32()),
            pa.array([r["width"] for r in rows], pa.int32()),
            pa.array([r["height"] for r in rows], pa.int32()),
            pa.array(keys_all, pa.string()),
        ],
        schema=LABELS_SCHEMA,
    )
    output = local_target(unit.output)  # a pool at a URL: this process's staging path, uploaded on close
    write_parquet_atomic(
        table,
        output,
        metadata={
            "silverlabel.decode_errors": str(len(errors)),
            "silverlabel.errors": json.dumps(errors[:100]),
            "silverlabel.missing": str(len(missing)),
            "silverlabel.missing_keys": json.dumps(missing[:100]),
            "silverlabel.limit": "" if unit.limit is None else str(unit.limit),
            "silverlabel.label_config": unit.published or json.dumps(cfg.published_config()),
            # which decoder made the pixels (the H200's JPEG engines were not bit-reproducible):
            # cpu, gpu, host, or both with its host share
            "silverlabel.decode": labeler.decode_mode + (f" {labeler.host_share:g}" if labeler.decode_mode == "both"
                                                         else ""),
            "silverlabel.version": __version__,
        },
    )
    if unit.commit is not None:
        unit.commit.write([output], info={"rows": len(rows), "decode_errors": len(errors),
                                               "missing": len(missing)})
    return LabelResult(unit.shard, len(rows), len(errors), time.monotonic() - t0, len(missing))


# ---------------------------------------------------------------------------------------
# the driver


class LabelStage(BaseStage):
    """``label`` for :func:`silverlabel.stage.run_stage`: one unit per ingest shard, bound to
    the shard's tar and samples table (relabeled when either changed)."""

    needs_gpu = True
    # the shards' identities (an md5 read where ingest left no record), computed while the
    # unit before runs
    plan_ahead = 2
    unit_fn = staticmethod(label_shard)

    def prepare(self) -> None:
        from silverlabel.teachers import validate_teacher_spec
        from silverlabel.teachers.labelspace import get_label_space

        cfg, pool = self.config, self.output
        self.out_dir = pool.labels_dir(cfg.name)  # a UserError for a name that is not a plain folder name
        get_label_space(cfg.label_space)  # fail early on bad input, before any model loads
        for spec in cfg.teachers:
            validate_teacher_spec(spec)
        man = pool.read_manifest()
        if man.get("stage") != "ingest":
            raise UserError(f"{pool.location}: label needs an ingest dataset, this one is {man.get('stage')!r}")
        self.name = man["name"]
        self.published = json.dumps(cfg.published_config())  # named once: a checkpoint is hashed once
        if not pool.samples_files():
            raise UserError(f"{pool.location}: no finished shards to label (run ingest first)")

    def folders(self) -> list[Path]:
        return [self.out_dir]

    def total(self) -> int | None:
        """The images to label: the pool's successful samples (its manifest's counts), at
        most ``--limit``."""
        n = (self.output.read_manifest().get("counts") or {}).get("success")
        if not isinstance(n, int):
            return None
        return n if self.config.limit is None else min(n, self.config.limit)

    def plan(self, engine: Engine) -> Iterator[LabelUnit]:
        cfg, pool = self.config, self.output
        remaining = cfg.limit

        def inputs(samples: Path) -> dict[str, Any]:  # bound to what ingest recorded of the shard
            ingested = pool.commit_path(samples.stem)
            return {"tar": file_identity(pool.shard_path(self.name, pool.shard_index(samples)), ingested),
                    "samples": file_identity(samples, ingested)}

        files = pool.samples_files()
        # a pool in a bucket: each shard's identities are a few requests, made 32 at a time (all
        # shards are planned, unless --limit stops early)
        threads = 32 if pool.url is not None and cfg.limit is None else 1
        bound_to = map_ordered(inputs, files, threads)
        for samples in files:
            shard = pool.shard_index(samples)
            if remaining is not None and remaining <= 0:
                break
            bound = next(bound_to)
            tar = pool.shard_path(self.name, shard)
            out = pool.labels_path(cfg.name, self.name, shard)
            commit = Commit(str(Dataset(self.out_dir).commit_path(out.stem)), {**cfg.output_config(), "limit": remaining},
                            bound)
            yield LabelUnit(shard, str(tar), str(samples), str(out), limit=remaining, commit=commit,
                            published=self.published)
            if remaining is not None:
                remaining -= pool.statuses(samples).count("success")

    def finish(self, run: StageRun) -> LabelSummary:
        cfg, pool = self.config, self.output
        write_classes(self.out_dir, cfg.label_space)  # _classes.json: the tables' class ids as wnids and names
        by_name = None if pool.url is None else [*run.planned, CLASSES_UNIT]  # a bucket: by name, never a listing
        files = pool.labels_files(cfg.name) if by_name is None else [self.out_dir / f"{n}.parquet" for n in run.planned]
        rows, decode_errors, missing = labels_counts(files)
        man = pool.read_manifest()
        config = json.loads(self.published)
        man.setdefault("labels", {})[cfg.name] = {
            "id": make_identity("labels", {"pool": dataset_identity(pool.root), "config": config,
                                           "content": records_digest(self.out_dir, by_name)}),
            "config": config,
            "rows": rows,
            "decode_errors": decode_errors,
            "missing": missing,
            "files": len(files),
            "partial": cfg.limit is not None,
            "silverlabel_version": __version__,
        }
        pool.write_manifest({k: v for k, v in man.items() if k not in ("format_version", "updated")})
        images_now = sum(r.rows + r.decode_errors for r in run.results)
        return LabelSummary(display(self.out_dir), rows, decode_errors, len(files), run.done_now, images_now, run.seconds,
                            run.device, missing)


def run_label(cfg: LabelConfig, progress: Report | None = None) -> LabelSummary:
    """Label every finished shard of ``cfg.dataset``; resumes per shard, and relabels a
    shard whose tar or samples table changed since it was labeled."""
    return run_stage(LabelStage(cfg, Pool(cfg.dataset)), progress)


# ---------------------------------------------------------------------------------------
# reading labels files back: counts, COYO's threshold table


def _unreadable(path: str | Path, e: Exception) -> UserError:
    """The one-line error for a labels file that is not readable parquet (truncated, damaged):
    its commit record no longer matches it, so ``label`` writes it again."""
    return UserError(f"{display(path)}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                     "run silverlabel label again to rewrite it")


def labels_counts(paths: list) -> tuple[int, int, int]:
    """(rows, decode errors, missing samples) over labels files, from their footers; a
    UserError naming a file that is not readable."""
    rows = decode_errors = missing = 0
    for p in paths:
        try:
            md = pq.read_metadata(parquet_source(p))
        except (OSError, pa.ArrowException) as e:
            raise _unreadable(p, e) from None
        kv = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
        rows += md.num_rows
        decode_errors += int(kv.get("silverlabel.decode_errors", 0))
        missing += int(kv.get("silverlabel.missing", 0))
    return rows, decode_errors, missing


def _batches(path: Any) -> Iterator[pa.RecordBatch]:
    """The labels and probabilities of one labels file, streamed; a UserError naming it when unreadable."""
    try:
        yield from pq.ParquetFile(parquet_source(path)).iter_batches(columns=["labels", "label_probs"], batch_size=65536)
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None


def threshold_stats(paths: list, thresholds: tuple[float, ...] = THRESHOLDS, num_classes: int = 21841) -> list[dict]:
    """For each threshold: average labels per image, distinct labels, share of images with >= 1.

    Streams one file at a time (a 300M-row table never sits in memory).
    """
    n_images = 0
    per_t = {t: {"labels": 0, "with_one": 0, "seen": np.zeros(num_classes, bool)} for t in thresholds}
    for p in paths:
        for batch in _batches(p):
            labels = batch.column(0)
            probs = batch.column(1)
            offsets = np.asarray(probs.offsets)
            pv = np.asarray(probs.values, dtype=np.float32)
            lv = np.asarray(labels.values, dtype=np.int64)
            rows = np.repeat(np.arange(len(batch)), np.diff(offsets))
            n_images += len(batch)
            for t, acc in per_t.items():
                hit = pv >= t
                acc["labels"] += int(hit.sum())
                acc["with_one"] += int(np.unique(rows[hit]).size)
                if hit.any():
                    acc["seen"][lv[hit]] = True
    return [
        {
            "threshold": t,
            "images": n_images,
            "avg_labels_per_image": acc["labels"] / n_images if n_images else 0.0,
            "distinct_labels": int(acc["seen"].sum()),
            "share_with_label": acc["with_one"] / n_images if n_images else 0.0,
        }
        for t, acc in per_t.items()
    ]
