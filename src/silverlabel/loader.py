"""The streaming training loader: a training set's shards -> deterministic, resumable batches.

Reads the shards of one split of a ``silverlabel shard`` output (``TRAINSET/_info.json``)
and yields ``(images [B,3,H,W] float32, cls [B] int64, labels [B,k] int64,
label_probs [B,k] float32)`` (plus ``keys``, a list of B sample keys, when
``return_keys``). ::

    >>> cfg = LoaderConfig("trainset", batch_size=256, rank=rank, world_size=world)  # doctest: +SKIP
    >>> for epoch in range(epochs):                                                 # doctest: +SKIP
    ...     for step, (x, cls, labels, probs) in enumerate(create_loader(cfg, epoch), start=0):
    ...         ...

Order (all of it a pure function of the config, ``epoch`` and nothing else; the rank and
world size only choose which part of it a process yields):

1. *The global stream*: in epoch ``e`` the split's shards are permuted with
   ``np.random.default_rng((seed, e))`` (training; eval keeps the file order), and the
   samples of shard ``s`` are read in the order of ``np.random.default_rng((seed, e, 1,
   s)).permutation(len)`` (training; eval keeps the shard's order). This concatenation,
   repeated cyclically, is the *stream*: one sequence for all ranks, the same as a
   1-process run reads.
2. *The epoch*: ``per_rank = num_samples // world_size`` (``drop_last``; otherwise
   ``ceil(num_samples / world_size)``) samples per rank, i.e. stream positions ``[0,
   world_size * per_rank)`` (without ``drop_last`` this can pass ``num_samples``: the
   stream wraps to its start, so every rank yields the same number of samples and batches
   and DDP never hangs).
3. *Batches*: with ``B = batch_size`` (per rank) and ``G = world_size * B`` (the global
   batch), global batch ``k`` is stream positions ``[k*G, min((k+1)*G, world_size *
   per_rank))`` and rank ``r`` takes the ``r``-th of its ``world_size`` equal slices: with
   ``m = min(B, per_rank - k*B)`` samples per rank, positions ``[k*G + r*m, k*G +
   (r+1)*m)``. So the ranks' batches ``k``, concatenated in rank order, are exactly batch
   ``k`` of a 1-process run with ``batch_size = G``, pixels included (see 5), and a rank
   reads and decodes only its own samples. ``steps_per_epoch = per_rank // B`` with
   ``drop_last`` (``ceil`` without). ``start_step=k`` starts at batch ``k``: the skipped
   samples are never read or decoded (positions map to (shard, offset) arithmetically;
   only tar headers are read).
4. *Workers*: with ``num_workers = W > 0`` worker ``w`` builds the whole batches
   ``start_step + j`` with ``j % W == w``; the DataLoader returns worker results
   round-robin in order, so **the batch sequence is identical for any ``num_workers``**
   (and for any ``start_step``: resuming at ``k`` gives exactly batches ``k, k+1, ...`` of
   the uninterrupted run, pixels included).
5. *Augmentation*: each sample's crop and flip come from
   ``np.random.default_rng((seed, e, 2, 0, position))`` with its *stream* position (the
   ``0`` stands where a rank number stood when ranks read streams of their own; kept so
   1-process batches are unchanged), so they are the same whichever rank or worker decodes
   the sample, and are reproduced on resume. Training: RandomResizedCrop(img_size,
   scale, ratio) with torchvision's parameter sampling (10 tries, then a central crop
   clamped to ``ratio``), bicubic, horizontal flip with probability ``hflip``. Eval:
   shorter side to ``int(img_size / 0.875)`` bicubic, then a center crop. JPEGs much
   larger than needed are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``), chosen so
   the crop region still has at least ``img_size`` pixels each way (no quality loss
   beyond the decoder's DCT scaling).

``labels``/``label_probs`` are the sample's top-k teacher labels from its ``.json``,
padded with -1 / 0.0 (or cut) to ``k`` = ``topk`` or, when that is None, the number of
labels of the first sample of the split's first shard (1 when the set has no top-k
labels; a sample without them then gets ``[cls]`` / ``[1.0]`` when ``cls >= 0``).

With ``kd=True`` (``--loss kd`` on a ``silverlabel reinforce`` output) a training sample is,
with probability ``p_reinforced``, one of its stored augmentations replayed exactly by
:func:`silverlabel.augment.replay` at ``img_size`` (the pixels the teacher saw, when
``img_size`` is the teacher's input size), with that augmentation's teacher top-k as
``labels``/``label_probs`` (``k`` from the ``.rnf`` header); the choice (reinforced or plain,
which augmentation) is drawn from ``(seed, epoch, key)``, or ``epoch % K`` with
``kd_aug="sequential"``. Plain samples get the usual crop/flip and their ``.json`` top-k.

Shards are read through one open file at a time per worker, a sample's members in one read
of their byte range at offsets from the tar headers
(:func:`silverlabel.formats.wds.iter_tar_samples`); no more than one sample's bytes are held
at a time. A training set at a URL (``s3://bucket/trainset``, any fsspec store) is read the
same way, streaming, nothing downloaded whole: ``_info.json`` and ``classes.json`` by one
GET each, a shard's headers through a file reading ahead ``INDEX_READ_AHEAD`` bytes per
request, and each sample by one ranged request, ``REMOTE_READS`` of them in flight per reader
(worker) so a request's latency does not bound the rate; the batches are those of the same
set on disk. Every rank reads the headers of the shards its slices
fall in (all ranks read the same shards at about the same time), but only its own
samples' members.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from silverlabel.augment import RNF_EXT, key_seed, read_header, replay, unpack
from silverlabel.errors import UserError
from silverlabel.formats.wds import TarSample, iter_tar_samples, read_member
from silverlabel.dataset import TrainSet, display, open_read, url_of

EVAL_CROP_PCT = 0.875
#: bytes a remote shard's header pass reads per request (several samples' headers of a typical
#: set; the members themselves are then read by range, one request per sample)
INDEX_READ_AHEAD = 1 << 20
#: ranged requests a reader of a remote shard keeps in flight (samples read ahead: twice that)
REMOTE_READS = 16
_BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class LoaderConfig:
    """What the loader yields. Everything here except ``num_workers`` (which never changes
    the batches) determines the sample sequence."""

    trainset: str
    split: str = "train"
    batch_size: int = 64
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    img_size: int = 224
    scale: tuple[float, float] = (0.05, 1.0)  # COYO-ViT inception crop area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    normalize: bool = True  # False: uint8 [B, 3, H, W] batches; normalise on the device (normalize_on)
    train: bool = True  # False: resize shorter side to img_size/0.875 + center crop, no flip, no shuffle
    drop_last: bool = True
    topk: int | None = None  # width of labels/label_probs; None: from the first sample
    return_keys: bool = False  # append the batch's sample keys (list[str]) to each batch
    draft: bool = True  # decode large JPEGs at reduced scale when that loses nothing
    kd: bool = False  # reinforced set (silverlabel reinforce): replay a stored augmentation, yield its teacher top-k
    kd_aug: str = "random"  # kd: which stored augmentation, random per (seed, epoch, key) | sequential (epoch % K)
    p_reinforced: float = 1.0  # kd: share of samples on a stored augmentation; the rest are plain samples

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "mean", "std"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UserError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.img_size < 1:
            raise UserError(f"img_size must be >= 1, got {self.img_size}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.kd_aug not in ("random", "sequential"):
            raise UserError(f"kd_aug must be random or sequential, got {self.kd_aug!r}")
        if not 0.0 <= self.p_reinforced <= 1.0:
            raise UserError(f"p_reinforced must be in [0, 1], got {self.p_reinforced}")
        if self.topk is not None and self.topk < 1:
            raise UserError(f"topk must be >= 1, got {self.topk}")


# ---------------------------------------------------------------------------------------
# the order


def _split_info(cfg: LoaderConfig) -> tuple[list[str], list[int]]:
    s = TrainSet(cfg.trainset).split(cfg.split)
    files, lengths = list(s["filenames"]), [int(x) for x in s["shard_lengths"]]
    if len(files) != len(lengths) or not files:
        raise UserError(f"{cfg.trainset}: split {cfg.split!r} lists no shards or mismatched shard_lengths")
    return files, lengths


def samples_per_rank(cfg: LoaderConfig, num_samples: int | None = None) -> int:
    """Samples each rank yields per epoch (before batching); the epoch is stream positions
    ``[0, world_size * samples_per_rank)``."""
    if num_samples is None:
        num_samples = sum(_split_info(cfg)[1])
    if cfg.drop_last:
        return num_samples // cfg.world_size
    return -(-num_samples // cfg.world_size)


def steps_per_epoch(cfg: LoaderConfig) -> int:
    """Batches per epoch, the same on every rank."""
    per_rank = samples_per_rank(cfg)
    return per_rank // cfg.batch_size if cfg.drop_last else -(-per_rank // cfg.batch_size)


def shard_order(cfg: LoaderConfig, epoch: int, num_shards: int) -> np.ndarray:
    """The epoch's shard order (before the split over ranks)."""
    if not cfg.train:
        return np.arange(num_shards)
    return np.random.default_rng((cfg.seed, epoch)).permutation(num_shards)


def sample_order(cfg: LoaderConfig, epoch: int, shard: int, length: int) -> np.ndarray:
    """The order in which the samples of ``shard`` are read in ``epoch``."""
    if not cfg.train:
        return np.arange(length)
    return np.random.default_rng((cfg.seed, epoch, 1, shard)).permutation(length)


def rank_positions(cfg: LoaderConfig, batch: int, per_rank: int) -> range:
    """The stream positions of rank ``cfg.rank``'s batch ``batch`` (its slice of global
    batch ``batch``; see the module docstring). Empty past the epoch."""
    B = cfg.batch_size
    m = max(0, min(B, per_rank - batch * B))
    start = batch * B * cfg.world_size + cfg.rank * m
    return range(start, start + m)


class _Stream:
    """The epoch's stream (the same for every rank): position -> (shard, index in shard),
    cyclic over the split's non-empty shards."""

    def __init__(self, cfg: LoaderConfig, epoch: int, lengths: list[int]):
        self.cfg, self.epoch = cfg, epoch
        order = shard_order(cfg, epoch, len(lengths)).tolist()
        self.shards = [s for s in order if lengths[s] > 0]
        if not self.shards:
            raise UserError(f"{cfg.trainset}: split {cfg.split!r} has only empty shards")
        lens = np.array([lengths[s] for s in self.shards], dtype=np.int64)
        self.lengths = lens
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        self.total = int(lens.sum())
        self._perm: tuple[int, np.ndarray] | None = None

    def locate(self, pos: int) -> tuple[int, int]:
        q = pos % self.total
        j = int(np.searchsorted(self.starts, q, side="right")) - 1
        shard = self.shards[j]
        if self._perm is None or self._perm[0] != j:
            self._perm = (j, sample_order(self.cfg, self.epoch, shard, int(self.lengths[j])))
        return shard, int(self._perm[1][q - int(self.starts[j])])


# ---------------------------------------------------------------------------------------
# decoding


def _crop_params(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy RNG: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draft(img: Image.Image, need_w: float, need_h: float) -> float:
    """Decode a JPEG at 1/2..1/8 scale if it stays >= (need_w, need_h); returns the factor."""
    if img.format != "JPEG":
        return 1.0
    w0, h0 = img.size
    if w0 < 2 * need_w or h0 < 2 * need_h:
        return 1.0
    img.draft("RGB", (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
    return img.size[0] / w0


def decode_image(data: bytes, cfg: LoaderConfig, rng: np.random.Generator | None) -> Image.Image:
    """JPEG bytes -> the augmented (train) or center-cropped (eval) RGB image, img_size^2."""
    size = cfg.img_size
    img = Image.open(io.BytesIO(data))
    w0, h0 = img.size
    if cfg.train:
        assert rng is not None
        top, left, h, w = _crop_params(rng, w0, h0, cfg.scale, cfg.ratio)
        flip = rng.random() < cfg.hflip
        f = _draft(img, w0 * size / w, h0 * size / h) if cfg.draft else 1.0
        img = img.convert("RGB")
        if f != 1.0:
            fx, fy = img.size[0] / w0, img.size[1] / h0
            box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        else:
            box = (left, top, left + w, top + h)
        img = img.resize((size, size), _BICUBIC, box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img
    short = int(size / EVAL_CROP_PCT)
    if w0 <= h0:
        nw, nh = short, int(short * h0 / w0)
    else:
        nw, nh = int(short * w0 / h0), short
    if cfg.draft:
        _draft(img, nw, nh)
    img = img.convert("RGB")
    img = img.resize((nw, nh), _BICUBIC)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


# x * (1/255) rather than x / 255: CUDA divides by a scalar as a multiply by its reciprocal,
# so this is the one form that is the same arithmetic on both devices.
_INV255 = 1.0 / 255.0


def to_tensor(img: Image.Image, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """PIL RGB -> normalized float32 [3, H, W] (ToTensor + Normalize); uint8 [3, H, W] when
    ``mean`` is None (``LoaderConfig.normalize=False``: 4x fewer bytes through the workers'
    queues and pinned memory, and no float work on the CPU)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    if mean is None:
        return x
    return x.float().mul_(_INV255).sub_(mean).div_(std)


def normalize_on(x: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """A batch from the loader as normalized float32 on ``x``'s device: uint8 batches
    (``normalize=False``) get ToTensor + Normalize there with the same operations as the
    CPU path (equal bits on the CPU, tested; on CUDA not checked); float batches are
    returned unchanged."""
    if x.dtype != torch.uint8:
        return x
    mean, std = _mean_std(cfg.mean, cfg.std, x.device)
    return x.float().mul_(_INV255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=8)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as [1, C, 1, 1] tensors on ``device``, made once (not a host copy per batch)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


def _targets(cls: int, meta: dict[str, Any], k: int) -> tuple[list[int], list[float]]:
    labels = meta.get("labels")
    probs = meta.get("label_probs")
    if labels is None:
        labels, probs = ([cls], [1.0]) if cls >= 0 else ([], [])
    elif probs is None:
        probs = [1.0] * len(labels)
    labels = [int(x) for x in labels[:k]]
    probs = [float(x) for x in probs[:k]]
    return labels + [-1] * (k - len(labels)), probs + [0.0] * (k - len(probs))


def collate(samples: list[tuple]) -> tuple:
    """``[(image, cls, labels, label_probs[, key]), ...]`` -> ``(images [B,3,H,W], cls [B],
    labels [B,k] int64, label_probs [B,k] float32[, keys])``."""
    images = torch.stack([s[0] for s in samples])
    cls = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    labels = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    probs = torch.tensor([s[3] for s in samples], dtype=torch.float32)
    if len(samples[0]) > 4:
        return images, cls, labels, probs, [s[4] for s in samples]
    return images, cls, labels, probs


def _identity(x):
    return x


# ---------------------------------------------------------------------------------------
# the dataset


def _open_shard(path: str, read_ahead: int):
    """A shard's file: local, or the object a staging path names (ranged reads, ``read_ahead``
    bytes per request); a missing one is a UserError naming its public URL or path."""
    try:
        return open_read(path, read_ahead)
    except FileNotFoundError:
        raise UserError(f"{display(path)}: shard listed in _info.json is missing") from None


def _remote_members(url: str, s: TarSample, skip: tuple[str, ...]) -> Any:
    """:func:`_sample_members` of a shard in a store: one ranged request (of any thread)."""
    from silverlabel import fs

    def read(offset: int, size: int) -> bytes:
        try:
            return fs.read_range(url, offset, size)
        except FileNotFoundError:
            raise UserError(f"{fs.public(url)}: shard listed in _info.json is missing") from None

    return _members(read, s, skip)


def _sample_members(f, s: TarSample, skip: tuple[str, ...] = ()) -> Any:
    """``ext -> bytes`` for sample ``s``'s members of the open shard ``f``: :func:`_members`."""
    return _members(lambda offset, size: read_member(f, offset, size), s, skip)


def _members(read: Any, s: TarSample, skip: tuple[str, ...]) -> Any:
    """``ext -> bytes`` for sample ``s``'s members, read (``read(offset, size)``) with one
    read of the byte range that holds them (one request on a remote shard), less the
    members in ``skip``; a member outside it is read on its own."""
    spans = [(o, n) for e, (o, n) in s.members.items() if e not in skip]
    if not spans:
        return lambda ext: read(*s.members[ext])
    start = min(o for o, _ in spans)
    buf = read(start, max(o + n for o, n in spans) - start)

    def member(ext: str) -> bytes:
        o, n = s.members[ext]
        if o < start or o + n > start + len(buf):
            return read(o, n)
        return buf[o - start:o - start + n]

    return member


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch, from ``start_step`` on (see the module docstring).

    Iterating yields collated batches; inside a DataLoader worker only that worker's share
    (batches ``start_step + j`` with ``j % num_workers == worker``), which the DataLoader
    (``batch_size=None``) puts back in order. :meth:`samples` yields single samples.
    """

    def __init__(self, cfg: LoaderConfig, epoch: int = 0, start_step: int = 0):
        if epoch < 0 or start_step < 0:
            raise UserError("epoch and start_step must be >= 0")
        self.cfg, self.epoch, self.start_step = cfg, epoch, start_step
        self.files, self.lengths = _split_info(cfg)
        self.num_samples = sum(self.lengths)
        self.per_rank = samples_per_rank(cfg, self.num_samples)
        self.steps = (self.per_rank // cfg.batch_size if cfg.drop_last
                      else -(-self.per_rank // cfg.batch_size))
        self._root = TrainSet(cfg.trainset).root  # a URL's: the staging path that names it (any process)
        self.k = cfg.topk if cfg.topk is not None else self._first_k()
        self._index: OrderedDict[int, list[TarSample]] = OrderedDict()

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _first_k(self) -> int:
        first = next(i for i, n in enumerate(self.lengths) if n > 0)
        with _open_shard(self._path(first), INDEX_READ_AHEAD) as f:
            sample = next(iter_tar_samples(f), None)
            if self.cfg.kd and sample is not None and RNF_EXT in sample.members:
                return read_header(read_member(f, *sample.members[RNF_EXT]))["topk"]
            if sample is None or "json" not in sample.members:
                return 1
            meta = json.loads(read_member(f, *sample.members["json"]))
        labels = meta.get("labels")
        return max(1, len(labels)) if labels else 1

    def _path(self, shard: int) -> str:
        """Shard ``shard``'s file: a local path, or the staging path naming its object."""
        return str(self._root / self.files[shard])

    def _shard_index(self, shard: int) -> list[TarSample]:
        idx = self._index.get(shard)
        if idx is None:
            path = self._path(shard)
            with _open_shard(path, INDEX_READ_AHEAD) as f:
                idx = list(iter_tar_samples(f))
            if len(idx) != self.lengths[shard]:
                raise UserError(f"{display(path)}: holds {len(idx)} samples, _info.json says {self.lengths[shard]}")
            self._index[shard] = idx
            while len(self._index) > 2:
                self._index.popitem(last=False)
        else:
            self._index.move_to_end(shard)
        return idx

    def _batches(self) -> list[int]:
        """The batch numbers this process builds."""
        info = torch.utils.data.get_worker_info()
        batches = range(self.start_step, self.steps)
        if info is None or info.num_workers <= 1:
            return list(batches)
        return list(batches[info.id :: info.num_workers])

    def _read(self, positions: Iterator[int]) -> Iterator[tuple]:
        cfg = self.cfg
        stream = _Stream(cfg, self.epoch, self.lengths)
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1) if cfg.normalize else None
        std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1) if cfg.normalize else None
        f, open_shard = None, -1
        skip = () if cfg.kd and cfg.train else (RNF_EXT,)
        remote = url_of(self._root) is not None
        pool = ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="silverlabel-loader") if remote else None
        try:
            for pos, shard, s, fetched in self._located(stream, positions, pool, skip):
                if shard != open_shard:
                    if f is not None:
                        f.close()
                    f = _open_shard(self._path(shard), 0)  # each sample: one ranged read
                    open_shard = shard
                ext = s.image_ext()
                if ext is None:
                    raise UserError(f"{self.files[shard]}: sample {s.key!r} has no image member")
                member = fetched if fetched is not None else _sample_members(f, s, skip=skip)
                data = member(ext)
                meta = json.loads(member("json")) if "json" in s.members else {}
                if "cls" in s.members:
                    cls = int(member("cls").decode().strip())
                else:
                    cls = int(meta.get("label", -1))
                rng = np.random.default_rng((cfg.seed, self.epoch, 2, 0, pos)) if cfg.train else None
                if cfg.kd and cfg.train:
                    kd = self._kd_sample(f, shard, s, data, mean, std, member)
                    if kd is not None:  # (image, teacher top-k labels, probs) of a stored augmentation
                        item = (kd[0], cls, kd[1], kd[2])
                        yield (*item, s.key) if cfg.return_keys else item
                        continue
                try:
                    img = decode_image(data, cfg, rng)
                except Exception as e:
                    raise UserError(f"{self.files[shard]}: sample {s.key!r}: cannot decode image ({e})") from e
                labels, probs = _targets(cls, meta, self.k)
                item = (to_tensor(img, mean, std), cls, labels, probs)
                yield (*item, s.key) if cfg.return_keys else item
        finally:
            if f is not None:
                f.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _located(self, stream: _Stream, positions: Iterator[int], pool: ThreadPoolExecutor | None, skip: tuple[str, ...]
                 ) -> Iterator[tuple[int, int, TarSample, Any]]:
        """``(position, shard, sample, members)`` for each position, in order. On a remote
        shard (``pool``) the members of the next ``2 * REMOTE_READS`` samples are read ahead,
        ``REMOTE_READS`` ranged requests at a time (a request's latency, not the bytes, bounds
        one reader), ``members`` then ``ext -> bytes``; locally None (read from the open file)."""
        positions = iter(positions)
        while chunk := list(itertools.islice(positions, 2 * REMOTE_READS if pool is not None else 1)):
            located = []
            for pos in chunk:
                shard, i = stream.locate(pos)
                located.append((pos, shard, self._shard_index(shard)[i]))
            if pool is None:
                yield from ((pos, shard, s, None) for pos, shard, s in located)
                continue
            urls = [url_of(self._path(shard)) for _pos, shard, _s in located]
            fetched = pool.map(lambda a: _remote_members(a[0], a[1], skip), zip(urls, (s for _p, _sh, s in located)))
            yield from ((pos, shard, s, m) for (pos, shard, s), m in zip(located, fetched))

    def _kd_sample(self, f, shard: int, s: TarSample, data: bytes, mean: torch.Tensor, std: torch.Tensor,
                   member: Any = None) -> tuple[torch.Tensor, list[int], list[float]] | None:
        """``--loss kd``: replay one of the sample's stored augmentations exactly (the pixels
        the teacher saw, at ``img_size``) and return its teacher top-k; None when this sample
        is drawn as a plain one (probability ``1 - p_reinforced``). The choice is a function of
        (seed, epoch, key): ``random`` draws an index, ``sequential`` takes ``epoch % K``."""
        cfg = self.cfg
        if RNF_EXT not in s.members:
            raise UserError(f"{self.files[shard]}: sample {s.key!r} has no .{RNF_EXT} member; "
                             "--loss kd needs a training set written by silverlabel reinforce")
        rng = key_seed(cfg.seed, s.key, self.epoch, 3)
        if cfg.p_reinforced < 1.0 and rng.random() >= cfg.p_reinforced:
            return None
        raw = member(RNF_EXT) if member is not None else read_member(f, *s.members[RNF_EXT])
        k = read_header(raw)["k"]
        j = self.epoch % k if cfg.kd_aug == "sequential" else int(rng.integers(k))
        r = unpack(raw, only=j)
        aug = r.augs[0]
        partner = None
        if aug.mix is not None:
            ps = self._shard_index(shard)[aug.mix.partner]
            p_raw = read_member(f, *ps.members[RNF_EXT])
            partner = (read_member(f, *ps.members[ps.image_ext()]), unpack(p_raw, only=aug.mix.partner_aug).augs[0])
        try:
            img = replay(data, aug, cfg.img_size, partner)
        except Exception as e:
            raise UserError(f"{self.files[shard]}: sample {s.key!r}: cannot replay augmentation {j} ({e})") from e
        labels = [int(x) for x in r.labels[0][: self.k]]
        probs = [float(x) for x in r.probs[0].astype(np.float32)[: self.k]]
        pad = self.k - len(labels)
        return to_tensor(img, mean, std), labels + [-1] * pad, probs + [0.0] * pad

    def _positions(self, batches: list[int] | range) -> Iterator[int]:
        for b in batches:
            yield from rank_positions(self.cfg, b, self.per_rank)

    def samples(self) -> Iterator[tuple]:
        """This rank's samples from batch ``start_step`` on, unbatched, in order:
        ``(image, cls, labels, label_probs[, key])``."""
        return self._read(self._positions(range(self.start_step, self.steps)))

    def __iter__(self) -> Iterator[tuple]:
        batches = self._batches()
        sizes = iter([len(rank_positions(self.cfg, b, self.per_rank)) for b in batches])
        size = next(sizes, 0)
        buf: list[tuple] = []
        for item in self._read(self._positions(batches)):  # one reader: open shard and index carry over
            buf.append(item)
            if len(buf) == size:
                yield collate(buf)
                buf, size = [], next(sizes, 0)


def create_loader(cfg: LoaderConfig, epoch: int = 0, start_step: int = 0, *, pin_memory: bool = False,
                  prefetch_factor: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over rank ``cfg.rank``'s batches of ``epoch``, starting at batch
    ``start_step``; make a new one per epoch. ``len(loader) == steps_per_epoch(cfg) -
    start_step``; the batches do not depend on ``num_workers``."""
    ds = ShardStream(cfg, epoch, start_step)
    kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=_identity, num_workers=cfg.num_workers,
                                       pin_memory=pin_memory, **kwargs)


class EpochBatches:
    """Batches of consecutive epochs, from batch ``start_step`` of ``epoch`` on: the same
    batches as a new :func:`create_loader` per epoch, the first ``batches_per_epoch`` of each
    (default: all; a trainer with gradient accumulation skips an epoch's incomplete tail).
    With workers, the next epoch's loader is started ``lookahead`` batches (default: its
    prefetch queue, 2 per worker) before the current one runs out, so worker start-up and the
    first decodes overlap the tail instead of stalling the GPU at every epoch boundary.
    ``limit``: stop after this many batches (no loader is started past it)."""

    def __init__(self, cfg: LoaderConfig, epoch: int = 0, start_step: int = 0, *, batches_per_epoch: int | None = None,
                 limit: int | None = None, pin_memory: bool = False, lookahead: int | None = None):
        self.cfg, self.epoch, self.start = cfg, epoch, start_step
        self.per_epoch = steps_per_epoch(cfg) if batches_per_epoch is None else batches_per_epoch
        if not 0 < self.per_epoch <= steps_per_epoch(cfg) or not 0 <= start_step < self.per_epoch:
            raise UserError(f"need 0 <= start_step < batches_per_epoch <= {steps_per_epoch(cfg)}, "
                             f"got {start_step}, {self.per_epoch}")
        self.limit = limit
        self.pin_memory = pin_memory
        self.lookahead = (2 * cfg.num_workers if lookahead is None else lookahead) if cfg.num_workers else 0

    def __iter__(self) -> Iterator[tuple]:
        epoch, pos, left = self.epoch, self.start, self.limit

        def start(e: int, at: int):
            return iter(create_loader(self.cfg, e, at, pin_memory=self.pin_memory))

        cur, nxt = start(epoch, pos), None
        while left is None or left > 0:
            remaining = self.per_epoch - pos
            if (nxt is None and self.lookahead and remaining <= self.lookahead
                    and (left is None or left > remaining)):
                nxt = start(epoch + 1, 0)
            yield next(cur)
            pos += 1
            if left is not None:
                left -= 1
            if pos == self.per_epoch and (left is None or left > 0):
                cur, nxt = (nxt if nxt is not None else start(epoch + 1, 0)), None
                epoch, pos = epoch + 1, 0

