"""``silverlabel reinforce``: K stored augmentations x teacher outputs per sample (ImageNet+ /
DataCompDR-style dataset reinforcement), replayed exactly at training time (``--loss kd``).

Input: a training set written by ``silverlabel shard`` (tars + ``_info.json``). Output: a new
training set with the same tar names, ``_info.json``, ``classes.json`` and wids indexes, in
which every sample of the reinforced splits keeps its members byte for byte (``.jpg``,
``.cls``, ``.json``, ...) and gains one member ``{key}.rnf`` (layout in
:mod:`silverlabel.augment` and DESIGN.md): K augmentations (crop box as fractions of the
source, flip, RandAugment ops, optional mixup/cutmix partner) and, for each, the teacher's
top-k probabilities (float16) and class indices (int32) in the output label space, plus
optionally the teacher's pre-logits embedding (float16). Splits not reinforced are copied.

How one shard is done (``reinforce_shard``, a pure function of (shard, config)):

1. the tar's headers are read; every image's size comes from its header (no decode);
   sample ``key`` (at position ``i`` of the shard) gets ``augment.sample_augs(policy, seed,
   key, W, H, K, n, i)`` — a function of (seed, key), never of processing order;
2. samples are decoded once each and their K augmentations replayed at each teacher's input
   size (a mixed augmentation replays its partner too), in batches of about ``batch_size``
   augmented images, the next two batches prepared while the teacher runs the current one.
   With ``replay="torch"`` (the default on a GPU) a batch's images are decoded by Pillow on
   host threads into pinned memory and copied to the teacher's device (``decode="host"``, the
   default: the CPU replay's pixels, reproducible), or there by the label stage's decoder
   (``decode="gpu"``: hardware JPEG engines first; not reproducible on the H200, see
   ``_host_decode``), and all its views are replayed there at once by
   :func:`silverlabel.replay_torch.replay_views` (Pillow's
   arithmetic in torch: on the CPU the same bytes as the Pillow replay), on a thread and CUDA
   stream of their own, straight into the teacher. With ``replay="pil"`` (the default on the
   CPU) :func:`silverlabel.augment.replay` replays each view with Pillow: on a thread
   pool (``threads``; Pillow holds the GIL for most of it, so this tops out near one core's
   rate) or, with ``replay_procs`` > 0, in that many spawned processes: each opens the
   source tar itself, replays one sample per task, and writes its pixels straight into a
   shared-memory ring of three batch slots (pickled arrays if ``/dev/shm`` lacks room). The
   same function does the replay either way, so the output is byte-identical;
3. the teacher (or ensemble, probabilities averaged; embeddings concatenated in teacher
   order) runs on the replayed pixels, normalised with its mean/std — on a GPU in fp16
   autocast with the label stage's device handling (``Labeler.classify``);
4. the output tar is written under a temporary name and renamed into place, then its
   commit record ``.done/{tar}.json`` (settings hash, the input shard's md5, the output's size
   and md5); a rerun skips shards whose record matches, and redoes one whose input changed.

The teacher sees ``replay(image, aug, S)`` at its input size ``S`` (``--img-size``
overrides); there is no extra eval crop (the augmentation is the crop).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory
from multiprocessing import util as mp_util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from silverlabel import __version__
from silverlabel.augment import (
    RNF_EXT,
    Aug,
    AugPolicy,
    bytes_per_aug,
    decode,
    pack,
    replay,
    replay_decoded,
    sample_augs,
    unpack,
)
from silverlabel.dataset import (INFO_FILE, TrainSet, atomic_write, display, drop_local, fetch_local, is_file,
                                 make_identity, named_teachers, open_read, parent_entry, read_bytes, records_digest,
                                 without_locations, write_json_atomic)
from silverlabel.engine import Engine, Report
from silverlabel.errors import UserError
from silverlabel.options import (cpu_count, device_field, engine_field, gpu_count, nested, opt, positive_int,
                                 precision_field, ray_address_field)
from silverlabel.hostdecode import DecodeRing as _DecodeRing
from silverlabel.hostdecode import attach_shm, decode_region
from silverlabel.hostdecode import shm_has_room as _shm_has_room
from silverlabel.hostdecode import watch_parent as _proc_init
from silverlabel.formats.wds import HashingFile, ShardWriter, iter_tar_samples, read_member, read_members
from silverlabel.stage import BaseStage, Commit, StageRun, file_identity, read_record, run_stage
from silverlabel.teachers import TeacherSpec
from silverlabel.teachers.labelspace import space_names



log = logging.getLogger(__name__)

REPLAY_MODES = ("auto", "torch", "pil")
DECODE_MODES = ("host", "gpu")  # where the torch replay decodes the stored images on a GPU


@dataclass(frozen=True)
class ReinforceConfig:
    """Everything ``reinforce`` needs; the runtime fields change speed, not the output —
    except that, as in ``label``, teacher outputs are reproducible for the same device and
    batch size (GPU fp16 and CPU fp32 differ in the last bits). The augmentations themselves
    never depend on the runtime fields."""

    trainset: str = opt(help="training set (silverlabel shard), or with --inspect a reinforced one", positional=True,
                        metavar="TRAINSET")
    output: str = opt(help="folder for the reinforced training set", short="-o", metavar="OUT")
    teachers: tuple[TeacherSpec, ...] = opt((TeacherSpec("efficientnet_lite0"),), flag="--teacher",
                                            action="teachers")
    label_space: str | None = opt(None, "space of the stored indices", choices=space_names,
                                  default_help="default: the first teacher's own")
    augs: int = opt(10, "augmentations stored per sample, K", type=positive_int)
    topk: int = opt(10, "teacher probabilities kept per augmentation", type=positive_int)
    embeddings: bool = opt(False, "also store the teacher's pre-logits embedding (float16)", action="store_true")
    splits: tuple[str, ...] = opt(("train",), "split to reinforce (repeatable); the others are copied", flag="--split",
                                  action="append", default_help="default: train")
    seed: int = opt(0, "augmentations are drawn from (seed, key)", type=int)
    policy: AugPolicy = nested(AugPolicy)
    img_size: int | None = opt(None, "teacher input size", type=positive_int, default_help="default: the teacher's")
    # runtime
    device: str = device_field()
    batch_size: int = opt(0, "augmented images per teacher forward", type=int, default_help="1024 GPU, 32 CPU")
    precision: str = precision_field()
    workers: int = opt(default_factory=gpu_count, help="processes", type=positive_int, auto_workers="gpu",
                       default_help="default: one per GPU, 1 on CPU; with --engine ray: one actor per cluster GPU")
    threads: int = opt(default_factory=cpu_count, help="replay threads per process, with --replay-procs 0",
                       type=positive_int, default_help="default: cores")
    # replay processes per worker: 0 = replay on ``threads`` threads; -1 = auto (0 on CPU; on a
    # GPU min(16, cores/workers - 1), or 0 where that is < 2 -- a default not yet measured on a GPU)
    replay_procs: int = opt(-1, "replay processes per worker (Pillow holds the GIL: threads top out near one core); "
                            "0 = replay on --threads threads", type=int, metavar="N",
                            default_help="default: 0 on CPU, min(16, cores/workers - 1) on a GPU")
    # where the stored augmentations are replayed: torch = batched on the teacher's device (the GPU
    # decodes and replays, replay_torch.py, Pillow's arithmetic), pil = augment.replay on CPU threads/processes
    replay: str = opt("auto", "where augmentations are replayed: torch (batched on the teacher's device) or pil "
                      "(Pillow on CPU threads/processes)", choices=REPLAY_MODES,
                      default_help="default: torch on a GPU, pil on the CPU")
    reserve_sms: int = opt(0, "with --replay torch on a GPU: SMs kept from the teacher for the decode and replay "
                           "(a CUDA green context, as label's --reserve-sms); 0 = the teacher shares every SM",
                           type=int, metavar="N")
    # with the torch replay on a GPU, where the stored images are decoded: host = Pillow on
    # threads (the CPU replay's pixels; reproducible), gpu = the label stage's GPU decoder
    decode: str = opt("host", "with --replay torch on a GPU: where images are decoded: host (Pillow's pixels on "
                      "host threads, JPEGs by libjpeg-turbo: the pixels the CPU replay and train --loss kd see; "
                      "reproducible) or gpu (the label stage's "
                      "decoder: hardware JPEG engines, nvJPEG; its last blocks of some images differed run to run "
                      "on the H200)", choices=DECODE_MODES)
    engine: str = engine_field()  # local | ray (a pool of actors that keep the teacher loaded)
    ray_address: str | None = ray_address_field()

    def __post_init__(self) -> None:
        if not self.teachers:
            raise UserError("reinforce needs at least one --teacher")
        if self.decode not in DECODE_MODES:
            raise UserError(f"--decode must be one of {', '.join(DECODE_MODES)}, not {self.decode!r}")
        if not 1 <= self.augs <= 0xFFFF:
            raise UserError(f"--augs must be in 1..65535, got {self.augs}")
        if not 1 <= self.topk <= 255:
            raise UserError(f"--topk must be in 1..255, got {self.topk}")
        if not self.splits:
            raise UserError("--split: name at least one split")
        if self.workers < (0 if self.engine == "ray" else 1) or self.threads < 1:
            raise UserError("--workers and --threads must be >= 1")
        if self.replay_procs < -1:
            raise UserError(f"--replay-procs must be >= 0 (or -1: auto), got {self.replay_procs}")
        if self.reserve_sms < 0:
            raise UserError(f"--reserve-sms must be >= 0, got {self.reserve_sms}")
        if self.replay not in REPLAY_MODES:
            raise UserError(f"--replay must be one of {', '.join(REPLAY_MODES)}, not {self.replay!r}")
        if self.replay == "torch" and self.replay_procs > 0:
            raise UserError("--replay-procs is for --replay pil (the torch replay runs on the teacher's device, "
                            "in one thread)")
        if os.path.abspath(self.output) == os.path.abspath(self.trainset):
            raise UserError("-o must not be the input training set")

    def output_config(self) -> dict[str, Any]:
        """The settings that determine the output; a resumed shard must match them."""
        return json.loads(json.dumps({
            "teachers": [{"name": t.name, "checkpoint": t.checkpoint, "activation": t.activation,
                          "label_space": t.label_space} for t in self.teachers],
            "label_space": self.label_space, "augs": self.augs, "topk": self.topk, "embeddings": self.embeddings,
            "splits": list(self.splits), "seed": self.seed, "policy": asdict(self.policy), "img_size": self.img_size,
            "precision": self.precision, "rnf_version": 1,
        }))


@dataclass
class ReinforceUnit:
    split: str
    filename: str
    src: str
    dst: str
    samples: int
    commit: Commit | None = None  # written last: the shard is done
    copy: bool = False  # a split not reinforced: copied byte for byte


@dataclass
class ReinforceResult:
    filename: str
    samples: int
    augs: int
    bytes: int
    md5: str
    rnf_bytes: int
    label_space: str
    emb_dim: int
    seconds: float
    copied: bool = False


@dataclass
class ReinforceSummary:
    output: str
    samples: int  # reinforced samples in the output
    shards: int
    shards_done_now: int
    shards_skipped: int
    samples_now: int
    augs_now: int
    seconds: float
    device: str
    label_space: str | None
    rnf_bytes: int  # total bytes of .rnf members
    augs_per_sample: int

    @property
    def augs_per_second(self) -> float:
        return self.augs_now / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_sample(self) -> float:
        return self.rnf_bytes / self.samples if self.samples else 0.0

    @property
    def bytes_per_aug(self) -> float:
        return self.bytes_per_sample / self.augs_per_sample if self.augs_per_sample else 0.0


# ---------------------------------------------------------------------------------------
# the unit function

_RUNNER_CACHE: dict[Any, Any] = {}


def get_teacher_runner(cfg: ReinforceConfig):
    """The process's Labeler for ``cfg`` (loaded once per worker; the label stage's device,
    precision and ensemble handling)."""
    from silverlabel.devices import worker_device

    device = worker_device(cfg.device)
    key = (cfg.teachers, cfg.label_space, cfg.topk, device, cfg.img_size, cfg.precision, cfg.reserve_sms, cfg.decode)
    with _RUNNER_LOCK:  # overlapping shards (threads) ask at once: one load
        return _teacher_runner(cfg, key)


_RUNNER_LOCK = threading.Lock()


def _teacher_runner(cfg: ReinforceConfig, key: tuple) -> Any:
    """get_teacher_runner's load, under its lock."""
    from silverlabel.inference import Labeler
    from silverlabel.teachers import create_teacher

    device = key[3]
    if key not in _RUNNER_CACHE:
        for old in _RUNNER_CACHE.values():
            old.close()
        _RUNNER_CACHE.clear()
        teachers = [create_teacher(t) for t in cfg.teachers]
        space = cfg.label_space or teachers[0].label_space
        overrides = {"input_size": (3, cfg.img_size, cfg.img_size) if cfg.img_size else None}
        # one GPU decoder (the torch replay's), on the hardware engines only with --decode gpu:
        # the host decode leaves it unused
        _RUNNER_CACHE[key] = Labeler(teachers, space, cfg.topk, device=device, decode_threads=1,
                                     overrides=overrides, precision=cfg.precision, decode_procs=0,
                                     reserve_sms=cfg.reserve_sms, gpu_decode_threads=1,
                                     hw_decode=cfg.decode == "gpu")
    return _RUNNER_CACHE[key]


class _Reader:
    """Thread-safe reads of member bytes from one tar (``os.pread``)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        self.path = path

    def read(self, loc: tuple[int, int]) -> bytes:
        off, size = loc
        data = os.pread(self.fd, size, off)
        if len(data) != size:
            raise OSError(f"{self.path}: member truncated at {off}")
        return data

    def read_many(self, locs: list[tuple[int, int]]) -> list[bytes]:
        """Each location's bytes, neighbours in one read (``wds.read_members``)."""
        try:
            return read_members(self.fd, locs)
        except OSError as e:
            raise OSError(f"{self.path}: {e}") from None

    def close(self) -> None:
        os.close(self.fd)


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header: a JPEG's frame header through libjpeg-turbo
    (a microsecond, the size Pillow reports), anything else (or a header libjpeg-turbo
    refuses) through Pillow, which raises for what it cannot read."""
    import io

    if data[:2] == b"\xff\xd8":
        try:
            import simplejpeg

            h, w, _space, _sub = simplejpeg.decode_jpeg_header(data)
            return w, h
        except (ImportError, ValueError):
            pass
    with Image.open(io.BytesIO(data)) as im:
        return im.size


DRAW_CHUNK = 32  # samples per augmentation-drawing task (a draw process's share of a shard)


def _draw_chunk(policy: AugPolicy, seed: int, keys: list[str], sizes: list[tuple[int, int]], k: int, n: int,
                start: int) -> list[list[Aug]]:
    """In a draw process: ``sample_augs`` of the samples at positions ``start, start + 1, ...``
    of a shard of ``n`` (the same call as in the stage's own process, hence the same lists)."""
    return [sample_augs(policy, seed, key, w, h, k, n, start + j) for j, (key, (w, h)) in enumerate(zip(keys, sizes))]


class _ShardAugs:
    """``augs[i]``: sample ``i``'s K augmentations (``augment.sample_augs``, a pure function of
    (policy, seed, key, size, K, shard length, position)), drawn on first use and kept.

    Drawn lazily so that drawing a shard's (about 0.2 ms of Python per sample at K=10)
    overlaps its replay and teacher instead of preceding them while the GPU idles: the
    Pillow paths draw each batch's as it is submitted. With ``pool`` (the torch replay on a
    GPU, where the stage's threads share one GIL and this Python was a fifth of it) the whole
    shard is drawn in those processes, ``DRAW_CHUNK`` samples per task in shard order, and
    only unpickled here; a sample whose chunk is not back yet (the first batches, while the
    processes start, or a far mixing partner) is drawn here instead. Either way the lists are
    equal, and two threads drawing the same sample get equal lists."""

    def __init__(self, cfg: ReinforceConfig, index: list, sizes: list[tuple[int, int]],
                 pool: ProcessPoolExecutor | None = None):
        self.cfg, self.index, self.sizes = cfg, index, sizes
        n = len(index)
        self._drawn: list[list[Aug] | None] = [None] * n
        self._chunks: dict[int, Any] = {}
        if pool is not None:
            for c in range(0, n, DRAW_CHUNK):
                keys = [s.key for s in index[c:c + DRAW_CHUNK]]
                self._chunks[c // DRAW_CHUNK] = pool.submit(_draw_chunk, cfg.policy, cfg.seed, keys,
                                                            sizes[c:c + DRAW_CHUNK], cfg.augs, n, c)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> list[Aug]:
        got = self._drawn[i]
        if got is not None:
            return got
        fut = self._chunks.get(i // DRAW_CHUNK)
        if fut is not None and fut.done():
            c = i // DRAW_CHUNK * DRAW_CHUNK
            try:
                drawn = fut.result()
            except Exception as e:  # noqa: BLE001 - e.g. a process that could not start (a script
                # without a main guard): the draws are pure, so this process draws them instead
                if self._chunks:
                    log.warning("augmentation-drawing processes failed (%s: %s): drawing in the stage's process",
                                type(e).__name__, e)
                self._chunks.clear()
            else:
                for j, a in enumerate(drawn):
                    if self._drawn[c + j] is None:
                        self._drawn[c + j] = a
                self._chunks.pop(i // DRAW_CHUNK, None)
                return self._drawn[i]
        cfg, (w, h) = self.cfg, self.sizes[i]
        got = sample_augs(cfg.policy, cfg.seed, self.index[i].key, w, h, cfg.augs, len(self.index), i)
        self._drawn[i] = got
        return got

    def cancel(self) -> None:
        """Drop the draws not yet started (the shard ended early, on an error)."""
        for fut in self._chunks.values():
            fut.cancel()
        self._chunks.clear()


def _sample_job(index: list, augs: _ShardAugs, i: int) -> tuple:
    """What replaying sample ``i`` needs, small enough to send to a process: (its image's
    (offset, size), its K augmentations, {partner: (its image's location, {aug index: aug})})."""
    s = index[i]
    partners: dict[int, tuple[tuple[int, int], dict[int, Aug]]] = {}
    for aug in augs[i]:
        if aug.mix is not None:
            p, pj = aug.mix.partner, aug.mix.partner_aug
            ps = index[p]
            partners.setdefault(p, (ps.members[ps.image_ext()], {}))[1][pj] = augs[p][pj]
    return s.members[s.image_ext()], augs[i], partners


def _replay_job(read, job: tuple, sizes: list[int], out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """One sample's K augmentations replayed at each size: one uint8 [K,S,S,3] per size
    (written into ``out``'s arrays when given). The thread and the process paths both run
    this, hence the same bytes."""
    loc, sample_augs_, partners = job
    img = decode(read(loc))
    decoded: dict[int, Image.Image] = {}
    result = []
    for d, size in enumerate(sizes):
        arr = out[d] if out is not None else np.empty((len(sample_augs_), size, size, 3), np.uint8)
        for j, aug in enumerate(sample_augs_):
            if aug.mix is None:
                arr[j] = np.asarray(replay_decoded(img, aug, size))
                continue
            p = aug.mix.partner
            if p not in decoded:
                decoded[p] = decode(read(partners[p][0]))
            arr[j] = replay(img, aug, size, partner=(decoded[p], partners[p][1][aug.mix.partner_aug]))
        result.append(arr)
    return result


# -- replay processes ----------------------------------------------------------------------

SLOTS = 3  # batches alive at once: the one the teacher runs + the two being replayed
HOST_DECODE_PROCS = 8  # processes decoding the torch replay's images on a GPU host (0: threads in the stage)
DECODE_SLOTS = 4  # batches of decoded pixels alive at once in the decode ring (TORCH_IN_FLIGHT + 1)
# teacher batches queued on the device at once: the next waits (asleep, without the GIL) for
# the oldest. Unbounded, a ViT-B/16 on the H200 fell behind the launches until the launch
# queue was full, and a launch then spun, holding the GIL, until a slot freed (4-15 s of the
# main thread's CPU per run, the replay and load threads stalled behind it)
TEACHER_AHEAD = 2
TORCH_IN_FLIGHT = 3  # torch replay batches submitted ahead: one loading, one replaying, one at the teacher
DRAW_PROCS = 2  # processes drawing a shard's augmentations for the torch replay on a GPU (~5k samples/s each)


def samples_per_batch(cfg: ReinforceConfig, device_type: str) -> int:
    """Samples per batch: ``cfg.batch_size`` augmented images (default 1024 on a GPU, 32 on the
    CPU) over K, at least 1. On a GPU the torch replay launches the same kernels whatever a
    batch's size, and that host work was its bound, so bigger batches spread it (256 before;
    issue 18, BENCHMARKS.md)."""
    return max(1, (cfg.batch_size or (1024 if device_type == "cuda" else 32)) // cfg.augs)


def resolve_replay_procs(cfg: ReinforceConfig, device_type: str) -> int:
    """``cfg.replay_procs``, with -1 (auto) resolved: 0 on CPU (the teacher wants the cores);
    on a GPU ``min(16, cores per worker - 1)``, or 0 (threads) where that is below 2.
    The GPU default is a guess from the 16-core H100 figures, not a measured optimum."""
    if cfg.replay_procs >= 0:
        return cfg.replay_procs
    if device_type != "cuda":
        return 0
    cores = cpu_count()
    n = min(16, cores // max(1, cfg.workers) - 1)
    return n if n >= 2 else 0


class _Ring:
    """``SLOTS`` batch slots of uint8 ``[per_batch, K, S, S, 3]`` per distinct size, in one
    shared-memory block that the replay processes write into by (slot, row)."""

    def __init__(self, per_batch: int, k: int, sizes: list[int]):
        self.k, self.sizes, self.per_batch = k, sizes, per_batch
        self.sample_bytes = [k * s * s * 3 for s in sizes]
        self.slot_bytes = per_batch * sum(self.sample_bytes)
        self.shm = shared_memory.SharedMemory(create=True, size=SLOTS * self.slot_bytes)

    @staticmethod
    def fits(per_batch: int, k: int, sizes: list[int]) -> bool:
        """Whether ``/dev/shm`` has room for the ring (:func:`_shm_has_room`)."""
        return _shm_has_room(SLOTS * per_batch * sum(k * s * s * 3 for s in sizes))

    def offsets(self, slot: int, row: int) -> list[int]:
        base, out = slot * self.slot_bytes, []
        for b in self.sample_bytes:
            out.append(base + row * b)
            base += self.per_batch * b
        return out

    def batch(self, slot: int, d: int, rows: int) -> np.ndarray:
        """The first ``rows`` samples of ``slot`` at size index ``d``, as ``[rows*K, S, S, 3]``."""
        s = self.sizes[d]
        return np.ndarray((rows * self.k, s, s, 3), np.uint8, buffer=self.shm.buf, offset=self.offsets(slot, 0)[d])

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still held by a traceback: the unlink frees it later
            self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


_PROC: dict[str, Any] = {}  # in a replay process: the current shard's token, reader and ring


def _attach(state: dict[str, Any], key: str, src: str, shm_name: str | None) -> None:
    """In a worker process: ``state``'s reader of tar ``src`` and attachment of shared memory
    ``shm_name`` (``reader``, ``shm``, ``buf``: a uint8 array over it), reopened when ``key``
    (a shard's token, or ``src``) or ``shm_name`` changes, the old ones closed."""
    if state.get("key") != key:
        if state.get("reader") is not None:
            state["reader"].close()
        state["reader"], state["key"] = _Reader(src), key
    attach_shm(state, shm_name)


def _proc_replay(token: str, src: str, job: tuple, sizes: list[int], shm_name: str | None,
                 offsets: list[int] | None) -> list[np.ndarray] | None:
    """In a replay process: replay one sample of shard ``src``, into the ring at ``offsets``
    (returns None) or, without a ring, returning the arrays (pickled back)."""
    _attach(_PROC, token, src, shm_name)  # a new shard: the previous one's file and ring dropped
    read = _PROC["reader"].read
    if shm_name is None:
        return _replay_job(read, job, sizes)
    buf = _PROC["shm"].buf
    k = len(job[1])
    out = [np.ndarray((k, s, s, 3), np.uint8, buffer=buf, offset=off) for s, off in zip(sizes, offsets)]
    _replay_job(read, job, sizes, out)
    del out
    return None


def resolve_replay(cfg: ReinforceConfig, device_type: str) -> str:
    """``cfg.replay`` with ``auto`` resolved: ``torch`` on a GPU, ``pil`` on the CPU."""
    if cfg.replay != "auto":
        return cfg.replay
    return "torch" if device_type == "cuda" else "pil"


class _TorchReplay:
    """Whole batches decoded and replayed on the teacher's device (:mod:`silverlabel.replay_torch`),
    in two steps ahead of the teacher: a batch's host work (its augmentations drawn, its bytes
    read and, with the default ``--decode host``, Pillow's pixels decoded into page-locked
    memory: on a GPU host by the decode processes into a slot of the decode ring, else on
    threads) on a load thread, then its replay on a replay thread, so the next batch loads
    while this one replays. With ``--decode gpu`` the label stage's decoder (hardware JPEG
    engines, nvJPEG, Pillow per image) decodes on the replay thread instead. On a GPU the
    replay runs on a CUDA stream at the highest priority (``inference.producer_stream``); the
    teacher runs on a stream of its own (not the legacy default stream, which would wait for
    the decoder's streams) after an event of the replay's."""

    def __init__(self, runner: Any, reader: _Reader, index: list, augs: _ShardAugs, sizes: list[int],
                 image_sizes: list[tuple[int, int]], decode: str = "host", threads: int = 4,
                 procs: tuple[ProcessPoolExecutor, int, _DecodeRing] | None = None):
        import torch

        self.torch, self.device = torch, runner.device
        self.image_sizes = image_sizes  # (W, H) per sample from the headers: the host decode's slab layout
        self.cuda = self.device.type == "cuda"
        self.decoder = runner.decoders[0] if self.cuda and runner.decoders and decode == "gpu" else None
        self.reader, self.index, self.augs, self.sizes = reader, index, augs, sizes
        self.pool = ThreadPoolExecutor(1)  # the replay (device work, in batch order)
        self.load_pool = ThreadPoolExecutor(1)  # each batch's host work, ahead of its replay
        # the host decode runs on these threads (libjpeg-turbo for JPEGs, Pillow for the rest;
        # neither holds the GIL while decoding) into pinned memory, copied to the
        # device on the replay's stream: one decode per image feeds K views, so a few cores keep
        # up with the teacher
        self.decode_pool = ThreadPoolExecutor(max(1, threads)) if self.decoder is None else None
        # on a GPU host, the decode runs in processes instead (pool, processes, ring): threads
        # here contended for the GIL with the replay's launches, stretching them 3x (the
        # replay thread's ~20 ms of CPU per batch took 60-77 ms while a batch decoded)
        self.procs = procs if self.cuda and self.decoder is None else None
        self.ring = procs[2] if procs is not None else None  # given back (_ring_done) by close()
        self.held: set[int] = set()  # ring slots this shard's loads took and no copy has freed yet
        self.overflowed = False  # a batch was too big for a ring slot (logged once)
        if self.cuda:
            from silverlabel.inference import producer_stream

            self.stream = producer_stream(self.device)  # highest priority: its small kernels go first
            # the teacher's stream, made once per worker: on a green context of all SMs but
            # --reserve-sms when asked (the teacher's long kernels otherwise hold every SM while
            # the replay's wait)
            self.model_stream = runner.teacher_stream()
        else:
            self.stream = self.model_stream = None

    def submit(self, batch: list[int]):
        """Start preparing ``batch``: its load (augmentations drawn, bytes read, host decode)
        on the load thread, then its replay on the replay thread. Batches submitted ahead
        load while earlier ones replay, so the replay never waits for a whole batch's decode."""
        load = self.load_pool.submit(self._load, batch)
        return self.pool.submit(self._prepare, batch, load)

    def _load(self, batch: list[int]) -> tuple[list[int], list[Any] | None]:
        """The images ``batch`` needs (its samples and their mixing partners, sorted) and, with
        the host decode, their pixels in (pinned) host memory; host work only."""
        partners = {a.mix.partner for i in batch for a in self.augs[i] if a.mix is not None}
        need = sorted(set(batch) | partners)
        return need, self._host_pixels(need)

    def _host_pixels(self, need: list[int]) -> tuple[Any, list[Any], int | None] | None:
        """With the host decode, ``need``'s images decoded off the replay thread; None when
        the GPU decoder decodes them (on the replay thread). On a GPU they are decoded into
        one page-locked block per batch, laid out from the sizes in the headers read at shard
        start: one copy to the device per batch, not one per image. The block is a slot of the
        decode ring, written by the decode processes, once they have started and where the
        batch fits; else a page-locked slab written by the decode threads.
        Returns (block or None, per image a uint8 [H, W, 3] tensor: a view of the block, or of
        its own memory for an image whose size is not its header's, ring slot or None)."""
        if self.decoder is not None:
            return None
        locs = [self.index[i].members[self.index[i].image_ext()] for i in need]
        if not self.cuda:
            return None, list(self.decode_pool.map(_host_decode, map(self.reader.read, locs))), None
        shapes = [(h, w, 3) for w, h in (self.image_sizes[i] for i in need)]
        ends = np.cumsum([h * w * 3 for h, w, _ in shapes]).tolist()
        total = ends[-1] if ends else 0
        if self.procs is not None and _pool_started("decode"):
            if 0 < total <= self.ring.slot_bytes:
                got = self._ring_pixels(need, locs, ends)
                if got is not None:
                    return got
            elif not self.overflowed:  # mixing partners beyond the slot's room: this batch on threads
                self.overflowed = True
                log.info("a batch's images (%d bytes) do not fit the decode ring's %d-byte slots: decoded on "
                         "threads", total, self.ring.slot_bytes)
        slab = self.torch.empty(total, dtype=self.torch.uint8, pin_memory=True)
        flat = slab.numpy()
        views = [flat[e - h * w * 3:e].reshape(h, w, 3) for e, (h, w, _) in zip(ends, shapes)]
        blobs = map(self.reader.read, locs)
        return slab, list(self.decode_pool.map(functools.partial(_host_decode, pin=True), blobs, views)), None

    def _ring_pixels(self, need: list[int], locs: list[tuple[int, int]], ends: list[int]
                     ) -> tuple[Any, list[Any], int] | None:
        """:meth:`_host_pixels` in the decode processes, into the next ring slot; None (and
        threads from now on, with a warning) when the processes fail."""
        pool, nprocs, ring = self.procs
        slot = ring.acquire()
        self.held.add(slot)  # freed when copied (_to_device), or with the shard's end (close)
        base = slot * ring.slot_bytes
        n = len(locs)
        starts = [0, *ends[:-1]]  # each image's place, laid out from the headers
        per = max(4, -(-n // nprocs))  # one task per process and batch, a few images at least
        futs: list = []
        try:
            for c in range(0, n, per):  # a run of images per task, into exactly their bytes
                last = min(c + per, n) - 1
                futs.append(pool.submit(decode_region, ring.shm.name, self.reader.path, locs[c:last + 1],
                                        base + starts[c], ends[last] - starts[c]))
            futures_wait(futs)
            results = [r for f in futs for r in f.result()[0]]  # raises only when a task or the pool failed
        except Exception as e:  # noqa: BLE001 - a broken pool: decode on threads from now on
            futures_wait(futs)  # no task still writing into the slot when it is given back
            self.held.discard(slot)
            ring.release(slot)
            log.warning("decode processes failed (%s: %s): decoding on threads", type(e).__name__, e)
            self.procs = None
            return None
        imgs = []
        for i, r in zip(need, results):
            if isinstance(r, tuple):  # in the slot (where the header said, or shifted by one that lied)
                off, h, w = r
                imgs.append(ring.host[off:off + h * w * 3].view(h, w, 3))
            elif isinstance(r, str):  # the batch fails; its slot is freed with the shard's (close)
                raise OSError(f"sample {self.index[i].key!r}: {r}")
            else:  # bigger than its header said, past the run's room: its pixels, page-locked here
                imgs.append(self.torch.from_numpy(r).pin_memory())
        return ring.host[base:base + ends[-1]], imgs, slot

    def _to_device(self, need: list[int], host: tuple[Any, list[Any], int | None] | None) -> tuple[list[Any], Any]:
        """The images as device tensors (on the current stream) and what must outlive their use."""
        from silverlabel.replay_torch import ref_tensor

        if host is not None:  # the host decode's pixels: one async copy per batch (or per image)
            slab, imgs, slot = host
            if slab is None:
                return [t.to(self.device, non_blocking=True) for t in imgs], host
            dev = slab.to(self.device, non_blocking=True)
            if slot is not None:  # the ring slot is free again once this copy has run
                self.held.discard(slot)
                self.ring.release(slot, self.torch.cuda.current_stream(self.device))
            out = []
            for t in imgs:
                start = t.data_ptr() - slab.data_ptr()
                if 0 <= start < slab.numel():  # in the slab: a view of its device copy
                    out.append(dev[start:start + t.numel()].view(t.shape))
                else:  # decoded elsewhere (a size the header did not give): its own copy
                    out.append(t.to(self.device, non_blocking=True))
            return out, host
        blobs = [self.reader.read(self.index[i].members[self.index[i].image_ext()]) for i in need]
        refs, errors, keep = self.decoder.decode(blobs)
        for i, err in zip(need, errors):
            if err is not None:
                raise OSError(f"sample {self.index[i].key!r}: {err}")
        return [ref_tensor(r, self.device) for r in refs], keep

    def _decode(self, need: list[int]) -> tuple[list[Any], Any]:
        """``need``'s images decoded as the stage does, on the current stream (the benchmark's phases)."""
        return self._to_device(need, self._host_pixels(need))

    def _prepare(self, batch: list[int], load: Any) -> tuple[list[Any], Any, Any]:
        from silverlabel.replay_torch import View, replay_views

        torch = self.torch
        need, host = load.result()
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext(), torch.inference_mode():
            pos = {i: j for j, i in enumerate(need)}
            images, keep = self._to_device(need, host)
            views = [View(pos[i], a, None if a.mix is None else
                          (pos[a.mix.partner], self.augs[a.mix.partner][a.mix.partner_aug]))
                     for i in batch for a in self.augs[i]]
            xs = [replay_views(images, views, size) for size in self.sizes]
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
        return xs, event, keep

    def images(self, prepared: tuple[list[Any], Any, Any]) -> list[Any]:
        """A prepared batch's uint8 [N, S, S, 3] tensors (one per distinct size), usable on the
        teacher's stream."""
        xs, event, _keep = prepared
        if self.cuda:
            self.model_stream.wait_event(event)
            for x in xs:
                x.record_stream(self.model_stream)
        return xs

    def model_context(self):
        return self.torch.cuda.stream(self.model_stream) if self.cuda else contextlib.nullcontext()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.load_pool.shutdown(wait=True, cancel_futures=True)
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True, cancel_futures=True)
        if self.ring is not None:  # slots of batches loaded but never copied (an error) are free again
            for slot in list(self.held):
                self.ring.release(slot)
            self.held.clear()
            _ring_done(self.ring)
            self.ring = None


def _host_decode(data: bytes, into: np.ndarray | None = None, pin: bool = False) -> Any:
    """Rule 1 (Pillow's RGB decode, the CPU replay's pixels) as a uint8 [H, W, 3] tensor,
    decoded into ``into`` (a slice of the batch's page-locked slab, sized from the header)
    when the image has that size, else with ``pin`` into page-locked memory of its own, so that
    the copy to the GPU is asynchronous (:func:`silverlabel.inference.rgb_tensor`:
    libjpeg-turbo without the GIL for JPEGs, the same bytes as Pillow's).

    The default decode of the torch replay because the GPU decoders were not reproducible on
    the H200: nvImageCodec's hardware engines, and torchvision's nvJPEG once, decoded the last
    blocks of a few toy photos differently in a process's first shard than later
    (``bench/reinforce_determinism.py --trace``; BENCHMARKS.md)."""
    from silverlabel.inference import rgb_tensor

    return rgb_tensor(data, pin, into)


_DECODE_RING: list[_DecodeRing] = []  # this worker's current ring (at most one)
_RING_LOCK = threading.Lock()


def _decode_ring(slot_bytes: int, torch: Any) -> _DecodeRing | None:
    """This worker's decode ring with slots of at least ``slot_bytes``, for one more shard
    (give it back with :func:`_ring_done`); made, or remade bigger, here. None when
    ``/dev/shm`` cannot hold it."""
    with _RING_LOCK:
        if not _DECODE_RING or _DECODE_RING[0].slot_bytes < slot_bytes:
            slot_bytes = -(-slot_bytes // (16 << 20)) * (16 << 20)  # whole 16 MiB: a slightly bigger shard reuses it
            if not _shm_has_room(slot_bytes * DECODE_SLOTS):
                return None
            while _DECODE_RING:
                _retire(_DECODE_RING.pop())
            _DECODE_RING.append(_DecodeRing(slot_bytes, DECODE_SLOTS, torch))
        ring = _DECODE_RING[0]
        ring.users += 1
        return ring


def _ring_done(ring: _DecodeRing) -> None:
    """A shard's end: a replaced ring goes with its last shard."""
    with _RING_LOCK:
        ring.users -= 1
        if ring.retired and ring.users <= 0:
            ring.close()


def _retire(ring: _DecodeRing) -> None:
    ring.retired = True
    if ring.users <= 0:
        ring.close()


def _warm(_: int) -> int:
    """A no-op task: a pool's processes start on the first tasks they are given."""
    return os.getpid()


_REPLAY_POOL: dict[str, tuple[int, ProcessPoolExecutor]] = {}  # role -> (procs, pool): kept across a worker's shards
_WARMING: dict[str, list] = {}  # role -> its pool's start-up tasks
_FINALIZER: list = []


def _replay_pool(procs: int, role: str = "replay") -> ProcessPoolExecutor:
    """This process's spawned pool for ``role`` (``replay``: the Pillow replay; ``draw``: the
    torch replay's augmentation draws; ``decode``: its host decode), made on first use and
    kept across shards; a different process count replaces it."""
    with _POOL_LOCK:  # overlapping shards (threads) ask at once: one pool
        return _make_pool(procs, role)


_POOL_LOCK = threading.RLock()


def _make_pool(procs: int, role: str) -> ProcessPoolExecutor:
    """:func:`_replay_pool` under its lock. A pool that broke (a process died) is replaced."""
    if role in _REPLAY_POOL and (_REPLAY_POOL[role][0] != procs or getattr(_REPLAY_POOL[role][1], "_broken", False)):
        _REPLAY_POOL.pop(role)[1].shutdown(wait=True, cancel_futures=True)
        _WARMING.pop(role, None)
    if role not in _REPLAY_POOL:
        pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_proc_init,
                                   initargs=(os.getpid(),))  # spawn: the driver may hold CUDA
        _REPLAY_POOL[role] = (procs, pool)
        _WARMING[role] = [pool.submit(_warm, i) for i in range(procs)]  # every process starts now
        if not _FINALIZER:
            # An engine worker (a pool process itself) never returns to the interpreter's exit,
            # where the pool would be shut down: without this, its exit waited on the replay
            # processes forever (--workers 2 with --replay-procs). Before multiprocessing's own
            # closers (priority 10), which would leave the pool's queue half shut.
            _FINALIZER.append(mp_util.Finalize(None, close_replay_pool, exitpriority=20))
    return _REPLAY_POOL[role][1]


def _broke_a_pool(e: BaseException | None) -> bool:
    """Whether ``e`` or an error it came from is a process pool's breaking."""
    from concurrent.futures.process import BrokenProcessPool

    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, BrokenProcessPool):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _pool_started(role: str) -> bool:
    """Whether every process of ``role``'s pool has started (run its first task)."""
    futs = _WARMING.get(role)
    return bool(futs) and all(f.done() and not f.cancelled() and f.exception() is None for f in futs)


def close_replay_pool() -> None:
    """Stop this process's replay, draw and decode processes (pending tasks cancelled, running
    ones awaited) and free the decode ring."""
    with _POOL_LOCK:
        while _REPLAY_POOL:
            _procs, pool = _REPLAY_POOL.pop(next(iter(_REPLAY_POOL)))
            pool.shutdown(wait=True, cancel_futures=True)
        _WARMING.clear()
    with _RING_LOCK:
        while _DECODE_RING:
            _retire(_DECODE_RING.pop())
    if _FINALIZER:
        _FINALIZER.pop().cancel()


def _shard_headers(src: str, where: str) -> tuple[list, list[tuple[int, int]]]:
    """Shard ``src``'s samples (their members' offsets) and every image's (width, height)
    from its header; a UserError naming the sample for one without an image or with an
    unreadable one."""
    index = list(iter_tar_samples(src))
    reader = _Reader(src)
    try:
        sizes: list[tuple[int, int]] = []
        for s in index:
            ext = s.image_ext()
            if ext is None:
                raise UserError(f"{where}: sample {s.key!r} has no image member")
            try:
                sizes.append(_image_size(reader.read(s.members[ext])))
            except Exception as e:
                raise UserError(f"{where}: sample {s.key!r}: cannot read the image ({e})") from None
    finally:
        reader.close()
    return index, sizes


def _read_shard(src: str, where: str, pool: ProcessPoolExecutor | None) -> tuple[list, list[tuple[int, int]]]:
    """:func:`_shard_headers`, in one of ``pool``'s processes when given. Read here while
    another shard runs, its thousands of small reads each gave up the GIL and waited up to
    the switch interval to get it back from the running shard's threads: on the H200 the
    next shard was often not ready when its turn came, and the teacher idled up to 0.9 s."""
    if pool is None:
        return _shard_headers(src, where)
    return pool.submit(_shard_headers, src, where).result()


def _reading_pool(cfg: ReinforceConfig, gpu_torch: bool) -> ProcessPoolExecutor | None:
    """Where a shard's headers are read: on a GPU host, the decode (or else the draw)
    processes once they have started; None (this thread) otherwise: on the CPU, and for a
    worker's first shard, which nothing runs beside."""
    if not gpu_torch:
        return None
    for role in ("decode", "draw"):
        if role in _REPLAY_POOL and _pool_started(role):
            return _REPLAY_POOL[role][1]
    return None


class _Turn:
    """A shard's turn to submit batches (to load, replay and classify them). Shards overlap
    (``reinforce_shard.overlap_units``): the next one reads its headers and draws while this
    one runs, then waits for its turn, which comes when this one has submitted its last
    batch. So the teacher gets the next shard's first batch as this one's last batches
    finish, and two shards never compete for the decode and replay."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.held = False

    def take(self) -> None:
        self._lock.acquire()
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self._lock.release()


def _host_decode_procs(cfg: ReinforceConfig, gpu_torch: bool) -> int:
    """How many processes decode the torch replay's images on a GPU host (0: none)."""
    return min(HOST_DECODE_PROCS, cfg.threads) if gpu_torch and cfg.decode == "host" else 0


def _start_pools(cfg: ReinforceConfig, gpu_torch: bool) -> None:
    """On a GPU host, the draw and decode processes started (asynchronously) first thing in
    a shard, so that a worker's first shard's header reads overlap their start."""
    if gpu_torch:
        _replay_pool(DRAW_PROCS, "draw")
        if procs := _host_decode_procs(cfg, gpu_torch):
            _replay_pool(procs, "decode")


def _decode_procs(cfg: ReinforceConfig, gpu_torch: bool, sizes_wh: list[tuple[int, int]],
                  per_batch: int) -> tuple[ProcessPoolExecutor, int, _DecodeRing] | None:
    """The torch replay's decode processes and ring on a GPU host (``--decode host``), or None:
    threads decode (on the CPU, with the GPU's decoders, ``HOST_DECODE_PROCS`` 0, or no room
    in ``/dev/shm``). A ring slot holds the shard's largest batch of images (twice that with
    mixing, whose partners come too; a batch that does not fit decodes on threads)."""
    procs = _host_decode_procs(cfg, gpu_torch)
    if not procs or not sizes_wh:
        return None
    import torch

    px = np.array([w * h * 3 for w, h in sizes_wh], np.int64)
    largest = max(int(px[b:b + per_batch].sum()) for b in range(0, len(px), per_batch))
    ring = _decode_ring(largest * (2 if cfg.policy.mixes else 1), torch)
    if ring is None:
        return None
    return _replay_pool(procs, "decode"), procs, ring


def reinforce_shard(unit: ReinforceUnit, cfg: ReinforceConfig, report: Report | None = None) -> ReinforceResult:
    """Reinforce one shard and write it atomically, then its commit record. Idempotent."""
    if unit.copy:
        return _copy_shard(unit)
    t0 = time.monotonic()
    report = report or (lambda d, s: None)
    runner = get_teacher_runner(cfg)
    sizes = [tf.size for tf in runner.transforms]
    distinct = sorted(set(sizes))
    # a training set at a URL: the tar is read whole anyway, so it is fetched once into this
    # process's staging folder (dropped after the shard)
    src = str(fetch_local(unit.src))
    where = display(unit.src)
    torch_on = resolve_replay(cfg, runner.device.type) == "torch"
    gpu_torch = torch_on and runner.device.type == "cuda"
    _start_pools(cfg, gpu_torch)
    try:  # every image's header read before any work; on a GPU in a started pool's process
        index, sizes_wh = _read_shard(src, where, _reading_pool(cfg, gpu_torch))
    except BaseException:
        drop_local(unit.src)
        raise
    n = len(index)
    reader = _Reader(src)
    k = cfg.augs
    ring: _Ring | None = None
    stack = contextlib.ExitStack()
    try:
        draw_pool = _replay_pool(DRAW_PROCS, "draw") if gpu_torch else None
        augs = _ShardAugs(cfg, index, sizes_wh, draw_pool)
        stack.callback(augs.cancel)
        per_batch = samples_per_batch(cfg, runner.device.type)
        batches = [list(range(b, min(n, b + per_batch))) for b in range(0, n, per_batch)]
        n_ops = cfg.policy.ra_ops
        rnf_bytes = 0
        emb_dim = 0
        out_path = Path(unit.dst)
        torch_replay = None
        procs = 0
        runner.prepare_classify(per_batch * k, cfg.embeddings)
        if torch_on:
            dprocs = _decode_procs(cfg, gpu_torch, sizes_wh, per_batch)
            try:
                torch_replay = _TorchReplay(runner, reader, index, augs, distinct, sizes_wh, cfg.decode,
                                            min(cfg.threads, 16), dprocs)
            except BaseException:
                if dprocs is not None:
                    _ring_done(dprocs[2])
                raise
            stack.callback(torch_replay.close)
        else:
            procs = resolve_replay_procs(cfg, runner.device.type)
        if torch_replay is not None:
            pool = None
        elif procs:
            pool = _replay_pool(procs)
            rows = min(per_batch, n)  # samples per slot
            if rows and _Ring.fits(rows, k, distinct):
                ring = _Ring(rows, k, distinct)
                stack.callback(ring.close)
            token = uuid.uuid4().hex
        else:
            pool = stack.enter_context(ThreadPoolExecutor(cfg.threads))
        turn = _Turn()
        stack.callback(turn.give)
        with atomic_write(out_path) as f:
            hf = HashingFile(f)
            window: deque = deque()
            next_batch = 0

            def submit() -> None:
                nonlocal next_batch
                if next_batch < len(batches):
                    b, slot = batches[next_batch], next_batch % SLOTS
                    if torch_replay is not None:
                        futs = [torch_replay.submit(b)]
                    elif not procs:
                        futs = [pool.submit(_replay_job, reader.read, _sample_job(index, augs, i), distinct) for i in b]
                    else:
                        shm = ring.shm.name if ring else None
                        futs = [pool.submit(_proc_replay, token, src, _sample_job(index, augs, i), distinct, shm,
                                            ring.offsets(slot, row) if ring else None) for row, i in enumerate(b)]
                    window.append((b, slot, futs))
                    next_batch += 1
                if next_batch == len(batches):
                    turn.give()  # all submitted: the next shard may start loading

            def write_batch(b: list[int], outputs: Any) -> tuple[int, int]:
                """Wait for one batch's teacher outputs, then pack and write its samples, in
                order (on the writer thread, so the main thread queues the teacher's next batch
                meanwhile); (rnf bytes, embedding width)."""
                idx, vals, emb = outputs.result()
                nbytes, dim = 0, 0
                # the batch's members in one read (they follow each other in the tar)
                exts = [[ext for ext in index[i].members if ext != RNF_EXT] for i in b]
                blobs = iter(reader.read_many([index[i].members[ext] for i, es in zip(b, exts) for ext in es]))
                for j, (i, es) in enumerate(zip(b, exts)):
                    s = index[i]
                    rows = slice(j * k, (j + 1) * k)
                    e = emb[rows] if emb is not None else None
                    dim = 0 if e is None else e.shape[1]
                    rnf = pack(augs[i], idx[rows], vals[rows].astype(np.float16), e, n_ops=n_ops)
                    nbytes += len(rnf)
                    members = {ext: next(blobs) for ext in es}
                    members[RNF_EXT] = rnf
                    writer.write(s.key, members)
                return nbytes, dim

            def written() -> None:
                nonlocal rnf_bytes, emb_dim
                count, fut = writes.popleft()
                nbytes, emb_dim = fut.result()
                rnf_bytes += nbytes
                report(count, count)

            writes: deque = deque()
            at_teacher: deque = deque()  # the teacher's batches queued on the device, oldest first
            write_pool = ThreadPoolExecutor(1)
            # batches in flight: the torch replay loads one, replays one and the teacher takes
            # a third; the Pillow paths fill two of the ring's slots ahead
            turn.take()
            report(0, 0)  # overlapping units: raises if the run stopped while this one waited its turn
            for _ in range(TORCH_IN_FLIGHT if torch_replay is not None else 2):
                submit()
            with ShardWriter(hf) as writer, contextlib.ExitStack() as writing:
                # left before the writer closes; on an error the batches queued for writing are
                # dropped (the temporary tar goes too)
                writing.callback(write_pool.shutdown, wait=True, cancel_futures=True)
                while window:
                    b, slot, futs = window.popleft()
                    try:
                        per_sample = [fut.result() for fut in futs]
                    except Exception as e:
                        raise UserError(f"{where}: cannot replay an image ({type(e).__name__}: {e})") from e
                    submit()  # keep the pool busy while the teacher runs (the ring slot of this batch is not reused)
                    teacher_ctx = contextlib.nullcontext()
                    if torch_replay is not None:  # one batch of device tensors, one per distinct size
                        xs = torch_replay.images(per_sample[0])
                        images = [xs[distinct.index(size)] for size in sizes]
                        teacher_ctx = torch_replay.model_context()
                    elif ring is not None:
                        images = [ring.batch(slot, distinct.index(size), len(b)) for size in sizes]
                    else:
                        images = [np.concatenate([ps[distinct.index(size)] for ps in per_sample]) for size in sizes]
                    while len(at_teacher) >= TEACHER_AHEAD:  # see TEACHER_AHEAD
                        at_teacher.popleft().wait()
                    with teacher_ctx:
                        outputs = runner.classify_async(images, embeddings=cfg.embeddings)
                    at_teacher.append(outputs)
                    del images, per_sample
                    xs = None
                    writes.append((len(b), write_pool.submit(write_batch, b, outputs)))
                    while writes and writes[0][1].done():
                        written()
                while writes:
                    written()
            f.flush()
            size = f.tell()
    except BaseException as e:
        # a broken pool is not reused (tasks in flight are awaited); healthy ones stay, for the
        # shards running beside this one (closed, they failed with a cancelled task, and theirs
        # was the error the run reported, not this one)
        if _broke_a_pool(e):
            close_replay_pool()
        raise
    finally:
        stack.close()
        reader.close()
        drop_local(unit.src)
    md5 = hf.md5.hexdigest()
    label_space = runner.target.name
    unit.commit.write([unit.dst], md5={unit.dst: md5}, info={
        "samples": n, "bytes": size, "md5": md5, "rnf_bytes": rnf_bytes, "label_space": label_space, "emb_dim": emb_dim})
    return ReinforceResult(unit.filename, n, n * k, size, md5, rnf_bytes, label_space, emb_dim, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------
# the driver


# in-process (--workers 1), the engine runs three shards at once: the next two read their
# headers and draw their augmentations while this one runs, and the next one's first batches
# overlap this one's last (see _Turn). With two, the shard after next starts reading only
# when this one ends, and on the bench's short shards the H200's teacher idled 100-300 ms
# at shard boundaries; three measured within the machine's noise of two (BENCHMARKS.md)
reinforce_shard.overlap_units = 3  # type: ignore[attr-defined]


def _copy_shard(unit: ReinforceUnit) -> ReinforceResult:
    """A shard of a split not reinforced: copied byte for byte, then committed."""
    t0 = time.monotonic()
    md5 = hashlib.md5()
    size = 0
    with open_read(unit.src) as fi, atomic_write(unit.dst) as fo:
        while chunk := fi.read(1 << 20):
            md5.update(chunk)
            fo.write(chunk)
            size += len(chunk)
    unit.commit.write([unit.dst], info={"samples": unit.samples, "bytes": size, "md5": md5.hexdigest()},
                      md5={unit.dst: md5.hexdigest()})
    return ReinforceResult(unit.filename, unit.samples, 0, size, md5.hexdigest(), 0, "", 0, time.monotonic() - t0,
                           copied=True)


class ReinforceStage(BaseStage):
    """``reinforce`` for :func:`silverlabel.stage.run_stage`: one unit per shard of the input
    training set (reinforced, or copied for the other splits), bound to that shard's bytes."""

    needs_gpu = True
    # the input tars' md5s (a training set not written by `shard` has no record of them),
    # computed while the unit before runs
    plan_ahead = 2
    unit_fn = staticmethod(reinforce_shard)

    def prepare(self) -> None:
        from silverlabel.teachers import validate_teacher_spec
        from silverlabel.teachers.labelspace import get_label_space

        cfg = self.config
        self.source = TrainSet(cfg.trainset)
        self.info = self.source.read_info()
        for split in cfg.splits:
            self.source.split(split, self.info)
        if cfg.label_space is not None:
            get_label_space(cfg.label_space)
        for spec in cfg.teachers:
            validate_teacher_spec(spec)
        self.output.previous_run("reinforce")
        for s in self.info.get("splits", {}).values():
            for filename in s["filenames"]:
                if not is_file(self.source.tar_path(filename)):
                    raise FileNotFoundError(f"{display(self.source.tar_path(filename))}: shard listed in {INFO_FILE} "
                                            "not found")

    def manifest(self) -> dict[str, Any]:
        config = self.config.output_config()  # as published: teachers' checkpoints by name, the input by its id
        return {"stage": "reinforce", "state": "running", "silverlabel_version": __version__,
                "name": self.info.get("name"), "config": {**config, "teachers": named_teachers(config["teachers"])},
                "parents": [parent_entry("trainset", self.config.trainset, self.output.root)]}

    def total(self) -> int:
        """The samples of the splits reinforced (copied shards report none)."""
        splits = self.info.get("splits", {})
        return sum(int(n) for sp in self.config.splits for n in splits.get(sp, {}).get("shard_lengths", ()))

    def done_work(self, unit: ReinforceUnit, record: dict[str, Any]) -> int:
        return 0 if unit.copy else unit.samples

    def plan(self, engine: Engine) -> Iterator[ReinforceUnit]:
        cfg, src, out = self.config, self.source, self.output
        for split, s in self.info.get("splits", {}).items():
            reinforced = split in cfg.splits
            for filename, length in zip(s["filenames"], s["shard_lengths"]):
                tar = src.tar_path(filename)
                commit = Commit(str(out.commit_path(filename)), cfg.output_config() if reinforced else {"copy": True},
                                {"source": file_identity(tar, src.commit_path(filename))})
                yield ReinforceUnit(split, filename, str(tar), str(out.tar_path(filename)), int(length), commit,
                                    copy=not reinforced)

    def finish(self, run: StageRun) -> ReinforceSummary:
        from silverlabel.teachers.labelspace import get_label_space

        cfg, out, info = self.config, self.output, self.info
        splits = info.get("splits", {})
        records = {fn: read_record(out.commit_path(fn))["info"] for s in splits.values() for fn in s["filenames"]}
        if is_file(self.source.classes_path):
            with atomic_write(out.classes_path) as f:
                f.write(read_bytes(self.source.classes_path))
        name = info.get("name") or out.root.name
        out.write_wids_indexes(name, {split: s["filenames"] for split, s in splits.items()}, records)
        reinforced = [records[fn] for sp in cfg.splits for fn in splits[sp]["filenames"]]
        n_samples = sum(int(n) for sp in cfg.splits for n in splits[sp]["shard_lengths"])
        rnf_total = sum(int(r.get("rnf_bytes", 0)) for r in reinforced)
        spaces = sorted({r.get("label_space") for r in reinforced if r.get("label_space")})
        if len(spaces) > 1:
            raise UserError(f"{out.root}: shards in different label spaces {spaces}; reinforce into a new -o")
        space = spaces[0] if spaces else cfg.label_space
        emb_dim = max((int(r.get("emb_dim", 0)) for r in reinforced), default=0)
        per_sample = rnf_total / n_samples if n_samples else 0.0
        manifest = self.manifest()
        manifest.update(
            state="complete",
            counts={split: int(sum(s["shard_lengths"])) for split, s in splits.items()},
            reinforce={
                "splits": list(cfg.splits), "label_space": space,
                "num_classes": len(get_label_space(space)) if space else None,
                "augs": cfg.augs, "topk": cfg.topk, "embeddings": cfg.embeddings, "emb_dim": emb_dim,
                "member": RNF_EXT, "rnf_version": 1, "samples": n_samples, "rnf_bytes": rnf_total,
                "bytes_per_sample": round(per_sample, 2), "bytes_per_aug": round(per_sample / cfg.augs, 2),
                "bytes_per_aug_schema": bytes_per_aug(cfg.topk, cfg.policy.ra_ops, emb_dim, cfg.policy.mixes),
            },
        )
        ident = make_identity("trainset", {"config": manifest["config"],
                                           "parents": without_locations(manifest["parents"]),
                                           "content": records_digest(out.root)})
        out.write_manifest({"id": ident, **manifest})
        write_json_atomic(out.info_path, info)
        done = [r for r in run.results if not r.copied]
        return ReinforceSummary(str(out.root), n_samples, len(done) + len(run.skipped), len(done), len(run.skipped),
                                sum(r.samples for r in done), sum(r.augs for r in done), run.seconds, run.device,
                                space, rnf_total, cfg.augs)


def run_reinforce(cfg: ReinforceConfig, progress: Report | None = None) -> ReinforceSummary:
    """Reinforce ``cfg.splits`` of ``cfg.trainset`` into ``cfg.output``; resumes per shard, and
    redoes a shard whose input shard changed."""
    try:
        return run_stage(ReinforceStage(cfg, TrainSet(cfg.output)), progress)
    finally:
        close_replay_pool()  # the in-process worker's (--workers 1); worker processes stop theirs on exit


# ---------------------------------------------------------------------------------------
# --inspect


def inspect_sample(trainset: str, key: str | None = None, split: str | None = None, top: int = 5) -> str:
    """A readable dump of one sample's ``.rnf`` member (the first one, or ``key``)."""
    from silverlabel.teachers.labelspace import get_label_space

    ts = TrainSet(trainset)
    info = ts.read_info()
    rinfo = ts.reinforce_info() or {}
    order = [split] if split else (list(rinfo.get("splits", [])) or list(info.get("splits", {})))
    for sp in order:
        for fn in ts.split(sp, info)["filenames"]:
            path = str(ts.tar_path(fn))
            for i, s in enumerate(iter_tar_samples(path)):
                if RNF_EXT not in s.members or (key is not None and s.key != key):
                    continue
                with open(path, "rb") as f:
                    data = read_member(f, *s.members[RNF_EXT])
                    image = read_member(f, *s.members[s.image_ext()]) if s.image_ext() else None
                return _format_sample(s.key, fn, i, data, image, rinfo, get_label_space, top)
    raise UserError(f"{trainset}: " + (f"no reinforced sample {key!r}" if key else "no reinforced samples")
                     + " (run silverlabel reinforce first?)")


def _format_sample(key, fn, pos, data, image, rinfo, get_label_space, top) -> str:
    r = unpack(data)
    w = h = None
    if image is not None:
        w, h = _image_size(image)
    space = rinfo.get("label_space")
    names = get_label_space(space) if space else None
    emb = f", embeddings {r.embeddings.shape[1]}-d float16" if r.embeddings is not None else ""
    lines = [f"sample {key} ({fn} #{pos}, image {w}x{h})",
             f"  .rnf: {r.nbytes} bytes = {r.nbytes / r.k:.1f} bytes per augmentation; K={r.k} augmentations, "
             f"top-{r.topk} in {space or '?'}{emb}"]
    for j, aug in enumerate(r.augs):
        lines.append(f"  [{j}] {aug.describe(w, h)}")
        tops = []
        for c, p in zip(r.labels[j][:top], r.probs[j][:top]):
            label = names.lemma(int(c)) if names is not None and 0 <= c < len(names) else "?"
            tops.append(f"{float(p):.3f} {label} ({int(c)})")
        lines.append(f"      top-{min(top, r.topk)}: " + "; ".join(tops)
                     + f"  [top-{r.topk} mass {float(r.probs[j].astype(np.float32).sum()):.3f}]")
    if rinfo:
        lines.append(f"  dataset: {rinfo.get('samples')} samples, {rinfo.get('bytes_per_sample')} bytes per sample, "
                     f"{rinfo.get('bytes_per_aug')} bytes per augmentation")
    return "\n".join(lines)
