"""Stored augmentations and their exact replay (``silverlabel reinforce`` and ``--loss kd``).

An augmentation is a handful of numbers, kept **relative to the source image** so that it
means the same region on any copy of the image (DataCompDR stores crop boxes in absolute
pixels of the image it saw, so a re-downloaded copy at another resolution replays a
different region):

- ``crop``: RandomResizedCrop box ``(x0, y0, w, h)`` as fractions of the decoded source's
  width and height, each stored as ``round(f * 65535)`` in a uint16;
- ``flip``: horizontal flip (applied after the crop);
- ``ops``: RandAugment ops applied after crop+flip, in order: an op id from :data:`OPS`,
  a sign, and a magnitude level ``0..255`` (``m = level / 255`` of the op's maximum);
- ``mix`` (optional): mixup or cutmix with a *partner*: another sample of the same shard
  (its position in the tar) and one of the partner's own stored augmentations (its crop,
  flip and ops; never its mix), plus the mixup weight or the cutmix box as fractions of the
  output image.

:func:`replay` turns (image bytes, augmentation, output size) into uint8 pixels. It is the
**one** code path: ``reinforce`` feeds its output to the teacher and the training loader
feeds it to the student, so at the same output size they are bit for bit the same image.

Replay rules (the contract; change them and stored augmentations mean something else):

1. Decode the whole source with Pillow and convert to RGB (no draft/DCT scaling: what is
   decoded must not depend on the crop or the output size).
2. Dequantize: ``f = q / 65535``; the crop box in source pixels is the **sub-pixel** box
   ``(x0*W, y0*H, (x0+w)*W, (y0+h)*H)`` (floats, not rounded), resampled to
   ``size x size`` with Pillow's bicubic ``resize(box=...)``. Because the box is
   continuous, a copy of the source at another resolution replays the same region; only
   resampling and re-encoding differ.
3. Flip left-right if set.
4. RandAugment ops in order on the ``size x size`` image (geometric ops are relative to the
   output size, fill grey 128, bilinear).
5. Mix: mixup ``round(lam * a + (1 - lam) * b)`` in float32; cutmix pastes the partner's
   pixels ``[round(y0*S), round((y0+h)*S)) x [round(x0*S), round((x0+w)*S))`` into ``a``.

    >>> aug = Aug(crop=(0, 0, 65535, 65535), flip=False, ops=())
    >>> aug.crop_fractions()
    (0.0, 0.0, 1.0, 1.0)
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from silverlabel.errors import UserError
from silverlabel.options import opt, pair

Q = 65535  # fraction quantisation: f = q / Q
FILL = (128, 128, 128)
_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR

# ---------------------------------------------------------------------------------------
# RandAugment op table (fixed: the ids are stored)


def _enhance(cls):
    def op(img: Image.Image, m: float, sign: int) -> Image.Image:
        return cls(img).enhance(1.0 + sign * 0.9 * m)

    return op


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=_BILINEAR, fillcolor=FILL)


def _solarize_add(img: Image.Image, m: float, sign: int) -> Image.Image:
    add = int(round(110 * m))
    lut = [min(255, i + add) if i < 128 else i for i in range(256)] * 3
    return img.point(lut)


#: id -> (name, fn(img, m in [0, 1], sign in {-1, 1}), signed). Magnitudes at m = 1:
#: rotate 30 degrees, shear 0.3, translate 0.45 of the side, enhance factor 1 +- 0.9,
#: posterize to 4 bits, solarize threshold 0, solarize-add +110.
OPS: tuple[tuple[str, Callable[[Image.Image, float, int], Image.Image], bool], ...] = (
    ("Identity", lambda img, m, s: img, False),
    ("AutoContrast", lambda img, m, s: ImageOps.autocontrast(img), False),
    ("Equalize", lambda img, m, s: ImageOps.equalize(img), False),
    ("Invert", lambda img, m, s: ImageOps.invert(img), False),
    ("Rotate", lambda img, m, s: img.rotate(s * 30.0 * m, resample=_BILINEAR, fillcolor=FILL), True),
    ("Posterize", lambda img, m, s: ImageOps.posterize(img, 8 - int(round(4 * m))), False),
    ("Solarize", lambda img, m, s: ImageOps.solarize(img, 256 - int(round(256 * m))), False),
    ("SolarizeAdd", _solarize_add, False),
    ("Color", _enhance(ImageEnhance.Color), True),
    ("Contrast", _enhance(ImageEnhance.Contrast), True),
    ("Brightness", _enhance(ImageEnhance.Brightness), True),
    ("Sharpness", _enhance(ImageEnhance.Sharpness), True),
    ("ShearX", lambda img, m, s: _affine(img, (1, s * 0.3 * m, 0, 0, 1, 0)), True),
    ("ShearY", lambda img, m, s: _affine(img, (1, 0, 0, s * 0.3 * m, 1, 0)), True),
    ("TranslateX", lambda img, m, s: _affine(img, (1, 0, s * 0.45 * m * img.size[0], 0, 1, 0)), True),
    ("TranslateY", lambda img, m, s: _affine(img, (1, 0, 0, 0, 1, s * 0.45 * m * img.size[1])), True),
)
OP_NAMES = tuple(name for name, _, _ in OPS)
#: ops RandAugment draws from (Identity is id 0 but only drawn as a no-op placeholder)
RA_CHOICES = tuple(range(1, len(OPS)))

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
MIX_NAMES = ("none", "mixup", "cutmix")
NO_PARTNER = 0xFFFFFFFF


@dataclass(frozen=True)
class Mix:
    mode: int  # MIX_MIXUP | MIX_CUTMIX
    partner: int  # partner's position in the shard (tar order)
    partner_aug: int  # which of the partner's stored augmentations
    params: tuple[int, int, int, int]  # mixup: (lam*Q, 0, 0, 0); cutmix: box (x0, y0, w, h) * Q of the output

    @property
    def lam(self) -> float:
        """Weight of this sample's own pixels."""
        if self.mode == MIX_MIXUP:
            return self.params[0] / Q
        return 1.0 - (self.params[2] / Q) * (self.params[3] / Q)


@dataclass(frozen=True)
class Aug:
    """One stored augmentation (quantized values: what is stored is what is replayed)."""

    crop: tuple[int, int, int, int]  # x0, y0, w, h in units of 1/65535 of the source
    flip: bool
    ops: tuple[tuple[int, int, int], ...] = ()  # (op id, sign -1|1, level 0..255)
    mix: Mix | None = None

    def crop_fractions(self) -> tuple[float, float, float, float]:
        return tuple(v / Q for v in self.crop)  # type: ignore[return-value]

    def base(self) -> Aug:
        """The augmentation without its mix (what a partner contributes)."""
        return Aug(self.crop, self.flip, self.ops) if self.mix is not None else self

    def describe(self, width: int | None = None, height: int | None = None) -> str:
        x0, y0, w, h = self.crop_fractions()
        s = f"crop x0={x0:.4f} y0={y0:.4f} w={w:.4f} h={h:.4f}"
        if width and height:
            s += f" (= {x0 * width:.1f},{y0 * height:.1f} {w * width:.1f}x{h * height:.1f} px of {width}x{height})"
        s += f" flip={int(self.flip)}"
        if self.ops:
            s += " ops=" + ",".join(f"{OP_NAMES[o]}({'-' if sg < 0 and OPS[o][2] else ''}{lv / 255:.2f})"
                                    for o, sg, lv in self.ops)
        if self.mix is not None:
            m = self.mix
            box = f", box={tuple(round(v / Q, 3) for v in m.params)}" if m.mode == MIX_CUTMIX else ""
            s += f" {MIX_NAMES[m.mode]}(partner #{m.partner} aug {m.partner_aug}, lam={m.lam:.3f}{box})"
        return s


# ---------------------------------------------------------------------------------------
# sampling


@dataclass(frozen=True)
class AugPolicy:
    """How augmentations are drawn (stored with the dataset; replay does not need it)."""

    scale: tuple[float, float] = opt((0.08, 1.0), "crop area range", type=pair, metavar="MIN,MAX",
                                     default_help="0.08,1")
    ratio: tuple[float, float] = opt((3 / 4, 4 / 3), "crop aspect range", type=pair, metavar="MIN,MAX",
                                     default_help="3/4,4/3")
    hflip: float = opt(0.5, "flip probability", type=float)
    ra_ops: int = opt(2, "RandAugment ops per augmentation; 0 = none", type=int)
    ra_magnitude: float = opt(9.0, "RandAugment magnitude, 0-10", type=float)  # of 10 (timm's rand-m9)
    ra_mstd: float = 0.5
    mix: str = opt("none", "mix each augmentation with another sample of the shard",
                   choices=("none", "mixup", "cutmix", "both"))
    mix_prob: float = opt(1.0, "share of augmentations mixed, with --mix", type=float)
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UserError(f"--scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise UserError(f"--ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 <= self.hflip <= 1 or not 0 <= self.mix_prob <= 1:
            raise UserError("--hflip and --mix-prob must be in [0, 1]")
        if not 0 <= self.ra_ops <= 255:
            raise UserError(f"--ra-ops must be in 0..255, got {self.ra_ops}")
        if not 0 <= self.ra_magnitude <= 10:
            raise UserError(f"--ra-magnitude must be in [0, 10], got {self.ra_magnitude}")
        if self.mix not in ("none", "mixup", "cutmix", "both"):
            raise UserError(f"--mix must be none, mixup, cutmix or both, not {self.mix!r}")

    @property
    def mixes(self) -> bool:
        return self.mix != "none" and self.mix_prob > 0


def key_seed(seed: int, key: str, *extra: int) -> np.random.Generator:
    """The generator of sample ``key``: a pure function of (seed, key, extra), never of order."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed), h, *[int(e) for e in extra]])


def _q(f: float) -> int:
    return int(min(Q, max(0, round(f * Q))))


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """``rng.uniform(low, high)``, the same double (numpy computes ``low + (high - low) *
    next_double``; ``tests/test_augment.py`` checks it), at a third of the call's cost."""
    return low + (high - low) * rng.random()


def sample_crop(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (10 tries, then a central crop clamped to
    ``ratio``), drawn in continuous coordinates and returned as quantized fractions."""
    area = width * height
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, lr[0], lr[1]))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            fw, fh = w / width, h / height
            fx, fy = _uniform(rng, 0, 1 - fw), _uniform(rng, 0, 1 - fh)
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            fw, fh = 1.0, (width / ratio[0]) / height
        elif in_ratio > ratio[1]:
            fw, fh = (height * ratio[1]) / width, 1.0
        else:
            fw, fh = 1.0, 1.0
        fx, fy = (1 - fw) / 2, (1 - fh) / 2
    qw, qh = max(1, _q(fw)), max(1, _q(fh))
    qx, qy = min(_q(fx), Q - qw), min(_q(fy), Q - qh)
    return qx, qy, qw, qh


def sample_augs(policy: AugPolicy, seed: int, key: str, width: int, height: int, k: int,
                shard_len: int = 1, position: int = 0) -> list[Aug]:
    """``k`` augmentations of sample ``key`` (source ``width x height``), a pure function of
    (policy, seed, key, size, k, shard_len, position) — the last two only choose mix partners."""
    rng = key_seed(seed, key)
    out = []
    for _ in range(k):
        crop = sample_crop(rng, width, height, policy.scale, policy.ratio)
        flip = bool(rng.random() < policy.hflip)
        ops = []
        for _ in range(policy.ra_ops):
            op = int(RA_CHOICES[int(rng.integers(len(RA_CHOICES)))])
            m = policy.ra_magnitude
            if policy.ra_mstd > 0:
                m = float(rng.normal(m, policy.ra_mstd))
            level = int(round(min(10.0, max(0.0, m)) / 10 * 255))
            sign = -1 if rng.random() < 0.5 else 1
            ops.append((op, sign if OPS[op][2] else 1, level))
        mix = None
        if policy.mixes and shard_len > 1 and rng.random() < policy.mix_prob:
            mode = {"mixup": MIX_MIXUP, "cutmix": MIX_CUTMIX}.get(policy.mix)
            if mode is None:
                mode = MIX_MIXUP if rng.random() < 0.5 else MIX_CUTMIX
            partner = int(rng.integers(shard_len - 1))
            partner += partner >= position
            partner_aug = int(rng.integers(k))
            if mode == MIX_MIXUP:
                lam = float(rng.beta(policy.mixup_alpha, policy.mixup_alpha))
                params = (_q(lam), 0, 0, 0)
            else:  # timm's rand_bbox: a box of area (1 - lam), centre uniform, clipped
                lam = float(rng.beta(policy.cutmix_alpha, policy.cutmix_alpha))
                r = math.sqrt(1 - lam)
                cx, cy = _uniform(rng, 0, 1), _uniform(rng, 0, 1)
                x0, x1 = max(0.0, cx - r / 2), min(1.0, cx + r / 2)
                y0, y1 = max(0.0, cy - r / 2), min(1.0, cy + r / 2)
                params = (_q(x0), _q(y0), _q(x1) - _q(x0), _q(y1) - _q(y0))
            mix = Mix(mode, partner, partner_aug, params)
        out.append(Aug(crop, flip, tuple(ops), mix))
    return out


# ---------------------------------------------------------------------------------------
# replay


def decode(data: bytes) -> Image.Image:
    """Rule 1: the whole source, decoded by Pillow, as RGB."""
    img = Image.open(io.BytesIO(data))
    if img.mode == "RGB":  # what convert("RGB") returns, without its copy (a third of the time)
        img.load()
        return img
    return img.convert("RGB")


def decode_rgb_array(data: bytes, alloc: Callable[[tuple[int, int, int]], np.ndarray] | None = None) -> np.ndarray:
    """Rule 1's pixels, ``np.asarray(decode(data))``, as a uint8 [H, W, 3] array.

    YCbCr and grayscale JPEGs are decoded by libjpeg-turbo through simplejpeg with Pillow's
    settings (accurate integer DCT, fancy upsampling): the same library and the same
    arithmetic, so the same bytes (``tests/test_augment.py`` checks it on real photos),
    in about half the time, without the GIL, straight into ``alloc((h, w, 3))`` when given
    (page-locked memory for a copy to a GPU). Anything else (PNG, WebP, CMYK, 12-bit, a
    stream libjpeg-turbo only warns about) goes through Pillow."""
    if data[:2] == b"\xff\xd8":
        try:
            import simplejpeg

            h, w, space, _sub = simplejpeg.decode_jpeg_header(data)
            if space in ("YCbCr", "Gray"):
                out = alloc((h, w, 3)) if alloc is not None else None
                return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False,
                                              buffer=out)
        except (ImportError, ValueError):
            pass  # Pillow decides (a clear error, or the pixels it makes of such a stream)
    if alloc is None:
        return np.array(decode(data))  # writable, as simplejpeg's
    a = np.asarray(decode(data))
    out = alloc(a.shape)
    out[...] = a
    return out


def crop_box(aug: Aug, width: int, height: int) -> tuple[float, float, float, float]:
    """Rule 2: the sub-pixel crop box (left, top, right, bottom) in source pixels."""
    x0, y0, w, h = aug.crop_fractions()
    return (x0 * width, y0 * height, (x0 + w) * width, (y0 + h) * height)


def replay_decoded(img: Image.Image, aug: Aug, size: int) -> Image.Image:
    """Rules 2-4 on a decoded RGB source: crop+resize, flip, RandAugment (no mix)."""
    out = img.resize((size, size), _BICUBIC, box=crop_box(aug, *img.size))
    if aug.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op, sign, level in aug.ops:
        out = OPS[op][1](out, level / 255, sign)
    return out


def apply_mix(a: np.ndarray, b: np.ndarray, mix: Mix) -> np.ndarray:
    """Rule 5 on two uint8 HxWx3 arrays of the same size."""
    if mix.mode == MIX_MIXUP:
        lam = np.float32(mix.params[0] / Q)
        out = a.astype(np.float32) * lam + b.astype(np.float32) * (np.float32(1) - lam)
        return np.rint(out).astype(np.uint8)
    s_h, s_w = a.shape[:2]
    x0, y0, w, h = (v / Q for v in mix.params)
    c0, c1 = int(round(x0 * s_w)), int(round((x0 + w) * s_w))
    r0, r1 = int(round(y0 * s_h)), int(round((y0 + h) * s_h))
    out = a.copy()
    out[r0:r1, c0:c1] = b[r0:r1, c0:c1]
    return out


def replay(data: bytes | Image.Image, aug: Aug, size: int,
           partner: tuple[bytes | Image.Image, Aug] | None = None) -> np.ndarray:
    """The augmented image as uint8 ``size x size x 3`` (rules 1-5).

    ``partner``: (the mix partner's bytes or decoded image, its augmentation), needed when
    ``aug.mix`` is set; its own mix is ignored."""
    img = data if isinstance(data, Image.Image) else decode(data)
    out = np.asarray(replay_decoded(img, aug, size))
    if aug.mix is None:
        return out
    if partner is None:
        raise UserError("this augmentation mixes with a partner sample: pass partner=(image, aug)")
    p_img = partner[0] if isinstance(partner[0], Image.Image) else decode(partner[0])
    b = np.asarray(replay_decoded(p_img, partner[1].base(), size))
    return apply_mix(out, b, aug.mix)


# ---------------------------------------------------------------------------------------
# the stored member: ``{key}.rnf``


RNF_EXT = "rnf"
RNF_VERSION = 1
HEADER = struct.Struct("<BBHBBH")  # version, flags, K, topk, n_ops, emb_dim  (8 bytes)
FLAG_EMB, FLAG_MIX = 1, 2
#: bytes per augmentation before embeddings and mix: 4k (int32 indices) + 2k (fp16 probs)
#: + 8 (crop) + 1 (flip/mix mode) + 2 * n_ops
MIX_BYTES = 4 + 2 + 8  # partner uint32, partner aug uint16, params 4 x uint16


def bytes_per_aug(topk: int, n_ops: int, emb_dim: int = 0, mix: bool = False) -> int:
    """Stored bytes per augmentation (the sample adds a fixed 8-byte header)."""
    return 6 * topk + 9 + 2 * n_ops + 2 * emb_dim + (MIX_BYTES if mix else 0)


def rnf_size(k: int, topk: int, n_ops: int, emb_dim: int = 0, mix: bool = False) -> int:
    return HEADER.size + k * bytes_per_aug(topk, n_ops, emb_dim, mix)


@dataclass
class Reinforcement:
    """The decoded ``.rnf`` member of one sample."""

    augs: list[Aug]
    labels: np.ndarray  # int32 [K, topk], most probable first, in the dataset's label space
    probs: np.ndarray  # float16 [K, topk]
    embeddings: np.ndarray | None = None  # float16 [K, D]
    version: int = RNF_VERSION
    nbytes: int = 0

    @property
    def k(self) -> int:
        return len(self.augs)

    @property
    def topk(self) -> int:
        return int(self.labels.shape[1])


@dataclass
class _Layout:
    k: int
    topk: int
    n_ops: int
    emb: int
    mix: bool
    offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pos = HEADER.size
        parts = [("labels", 4 * self.topk), ("probs", 2 * self.topk), ("crop", 8), ("flags", 1),
                 ("ops", 2 * self.n_ops)]
        if self.mix:
            parts += [("partner", 4), ("partner_aug", 2), ("mix_params", 8)]
        if self.emb:
            parts.append(("emb", 2 * self.emb))
        for name, per in parts:
            self.offsets[name] = pos
            pos += per * self.k
        self.size = pos


def pack(augs: Sequence[Aug], labels: np.ndarray, probs: np.ndarray, embeddings: np.ndarray | None = None,
         n_ops: int | None = None) -> bytes:
    """Serialize one sample's reinforcement (see DESIGN.md for the byte layout).

    All augmentations of a sample carry ``n_ops`` RandAugment slots (shorter lists are padded
    with Identity); the mix block is written when any augmentation mixes."""
    k = len(augs)
    labels = np.ascontiguousarray(labels, dtype="<i4").reshape(k, -1)
    probs = np.ascontiguousarray(probs, dtype="<f2").reshape(k, -1)
    topk = labels.shape[1]
    if probs.shape != labels.shape:
        raise UserError(f"labels {labels.shape} and probs {probs.shape} differ")
    if not 1 <= k <= 0xFFFF or not 1 <= topk <= 255:
        raise UserError(f"need 1 <= K <= 65535 and 1 <= topk <= 255 (K={k}, topk={topk})")
    n_ops = max((len(a.ops) for a in augs), default=0) if n_ops is None else n_ops
    mix = any(a.mix is not None for a in augs)
    emb = 0 if embeddings is None else int(np.asarray(embeddings).reshape(k, -1).shape[1])
    flags = (FLAG_EMB if emb else 0) | (FLAG_MIX if mix else 0)
    crop = np.array([a.crop for a in augs], dtype="<u2")
    aflags = np.array([int(a.flip) | ((a.mix.mode if a.mix else 0) << 1) for a in augs], dtype="u1")
    ops = np.zeros((k, n_ops, 2), dtype="u1")
    for i, a in enumerate(augs):
        if len(a.ops) > n_ops:
            raise UserError(f"augmentation {i} has {len(a.ops)} ops, more than n_ops={n_ops}")
        for j, (op, sign, level) in enumerate(a.ops):
            ops[i, j] = (op | (0x80 if sign < 0 else 0), level)
    parts = [HEADER.pack(RNF_VERSION, flags, k, topk, n_ops, emb), labels.tobytes(), probs.tobytes(),
             crop.tobytes(), aflags.tobytes(), ops.tobytes()]
    if mix:
        parts.append(np.array([a.mix.partner if a.mix else NO_PARTNER for a in augs], dtype="<u4").tobytes())
        parts.append(np.array([a.mix.partner_aug if a.mix else 0 for a in augs], dtype="<u2").tobytes())
        parts.append(np.array([a.mix.params if a.mix else (0, 0, 0, 0) for a in augs], dtype="<u2").tobytes())
    if emb:
        parts.append(np.ascontiguousarray(embeddings, dtype="<f2").reshape(k, emb).tobytes())
    out = b"".join(parts)
    assert len(out) == rnf_size(k, topk, n_ops, emb, mix)
    return out


def read_header(data: bytes) -> dict[str, int]:
    if len(data) < HEADER.size:
        raise UserError(f"reinforcement member too short ({len(data)} bytes)")
    version, flags, k, topk, n_ops, emb = HEADER.unpack_from(data)
    if version != RNF_VERSION:
        raise UserError(f"reinforcement member version {version}, this silverlabel reads {RNF_VERSION}")
    return {"version": version, "flags": flags, "k": k, "topk": topk, "n_ops": n_ops, "emb_dim": emb}


def unpack(data: bytes, *, only: int | None = None) -> Reinforcement:
    """Parse a ``.rnf`` member (``only=i``: just augmentation ``i``, for the loader)."""
    h = read_header(data)
    lay = _Layout(h["k"], h["topk"], h["n_ops"], h["emb_dim"] if h["flags"] & FLAG_EMB else 0,
                  bool(h["flags"] & FLAG_MIX))
    if len(data) != lay.size:
        raise UserError(f"reinforcement member is {len(data)} bytes, its header says {lay.size}")
    k = lay.k
    rows = range(k) if only is None else [only]
    if only is not None and not 0 <= only < k:
        raise IndexError(f"augmentation {only} of {k}")

    def arr(name: str, dtype: str, per: int) -> np.ndarray:
        a = np.frombuffer(data, dtype=dtype, count=k * per, offset=lay.offsets[name]).reshape(k, per)
        return a if only is None else a[only : only + 1]

    labels = arr("labels", "<i4", lay.topk).astype(np.int32)
    probs = arr("probs", "<f2", lay.topk).astype(np.float16)
    crop = arr("crop", "<u2", 4)
    aflags = arr("flags", "u1", 1)[:, 0]
    ops = arr("ops", "u1", 2 * lay.n_ops).reshape(len(rows), lay.n_ops, 2)
    if lay.mix:
        partner, paug = arr("partner", "<u4", 1)[:, 0], arr("partner_aug", "<u2", 1)[:, 0]
        mparams = arr("mix_params", "<u2", 4)
    augs = []
    for j, _i in enumerate(rows):
        mode = int(aflags[j]) >> 1
        mix = None
        if lay.mix and mode != MIX_NONE:
            mix = Mix(mode, int(partner[j]), int(paug[j]), tuple(int(v) for v in mparams[j]))
        op_list = tuple((int(o) & 0x7F, -1 if int(o) & 0x80 else 1, int(lv)) for o, lv in ops[j] if int(o) & 0x7F)
        for o, _s, _l in op_list:
            if o >= len(OPS):
                raise UserError(f"unknown RandAugment op id {o}")
        augs.append(Aug(tuple(int(v) for v in crop[j]), bool(aflags[j] & 1), op_list, mix))
    emb = arr("emb", "<f2", lay.emb).astype(np.float16) if lay.emb else None
    return Reinforcement(augs, labels, probs, emb, h["version"], len(data))
