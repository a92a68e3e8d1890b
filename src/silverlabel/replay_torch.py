"""Batched replay of stored augmentations in torch, on any device (issue 18).

:func:`replay_views` gives, for a batch of decoded images and their stored augmentations
(:class:`silverlabel.augment.Aug`), the same uint8 pixels as :func:`silverlabel.augment.replay`
(Pillow), computed for all views at once on the images' device. It follows Pillow's own
arithmetic, step by step, rather than an approximation of it:

- **crop + resize** (rule 2): Pillow's two-pass ``ImagingResample`` with a sub-pixel box. The
  box is rounded to float32 as Pillow's C code receives it; the bicubic (a = -0.5) filter
  coefficients are computed in float64 in the same order as ``precompute_coeffs`` (the
  window sum accumulated tap by tap) and rounded to 22-bit fixed point; the first pass
  rounds to an 8-bit intermediate, then the second: rows first, except where the installed
  Pillow (>= 13) goes columns first (:func:`vertical_first`). Each pass is a float64 matrix
  product with banded coefficient matrices (every product and partial sum is an integer
  below 2^53, so the result is exact, whatever the summation order), batched over images
  of the same size bucket (zero padding adds nothing);
- **flip** (rule 3): a mirror;
- **RandAugment** (rule 4), the views grouped by op at each step: point ops (Invert,
  Posterize, Solarize, SolarizeAdd, AutoContrast, Equalize) as one per-view, per-channel
  lookup table, built from each view's histograms as ``ImageOps`` builds it; Color,
  Contrast, Brightness and Sharpness as ``Image.blend`` with a float32 factor and C's
  truncation, their degenerate images as Pillow makes them (ITU-R 601 luma in 16-bit fixed
  point, the luma histogram's mean, the SMOOTH 3x3 filter in float32 with the border
  copied); Rotate, Shear and Translate as Pillow's generic affine transform: float64
  source coordinates at pixel centres, bilinear interpolation with clamped neighbours,
  truncated, grey 128 outside;
- **mix** (rule 5): mixup in float32 rounded half to even, cutmix by Python-rounded box.

On the CPU the result equals Pillow's bit for bit (tests/test_replay_torch.py measures it per
op); on a GPU the arithmetic is the same IEEE arithmetic, and only the JPEG decode (the
hardware engines' IDCT) can differ from Pillow's by a grey level here and there.

Cost: the resize is dense, ``2 * 3 * H * W * S`` multiply-adds per view for the horizontal pass
(plus ``2 * 3 * S * S * H`` vertical), where Pillow's banded loops need about ``4 * scale``
per output pixel: on a GPU's float64 tensor cores that is a few ms per batch of 256 views of
640x480 photos; on the CPU it is the slow part (the stage replays with Pillow there by
default). Every launch is per batch or per op family, never per view, except cutmix's paste.
On a GPU the resize (the label stage's banded kernels with taps from
``replay_kernels.box_coeffs``) and the RandAugment ops (``replay_kernels``) run as Triton
kernels with the same arithmetic and bytes; the torch code here is their reference and their
fallback.

    >>> import torch
    >>> from silverlabel.augment import Aug, Q
    >>> img = torch.arange(8 * 6 * 3, dtype=torch.uint8).reshape(8, 6, 3)
    >>> out = replay_views([img], [View(0, Aug((0, 0, Q, Q), True))], 4)
    >>> tuple(out.shape), out.dtype
    ((1, 4, 4, 3), torch.uint8)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from silverlabel.augment import MIX_CUTMIX, MIX_MIXUP, OPS, Q, Aug
from silverlabel.errors import UserError

# Divisions are tensor / tensor throughout: torch computes ``scalar / tensor`` and, on CUDA,
# ``tensor / python scalar`` as a multiplication by the reciprocal, which is not the correctly
# rounded quotient that C and Python compute (one ulp is enough to move a truncation).
PRECISION_BITS = 22  # Pillow's fixed-point resampling coefficients
_HALF = float(1 << (PRECISION_BITS - 1))
_ONE = float(1 << PRECISION_BITS)

# op ids (augment.OPS is the table; these are its fixed ids)
IDENTITY, AUTOCONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, SOLARIZE, SOLARIZE_ADD = range(8)
COLOR, CONTRAST, BRIGHTNESS, SHARPNESS, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = range(8, 16)
LUT_OPS = frozenset({AUTOCONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD})
BLEND_OPS = frozenset({COLOR, CONTRAST, BRIGHTNESS, SHARPNESS})
AFFINE_OPS = frozenset({ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y})
assert len(OPS) == 16 and OPS[SHARPNESS][0] == "Sharpness" and OPS[TRANSLATE_Y][0] == "TranslateY"


@dataclass(frozen=True)
class View:
    """One augmented view to replay: ``images[image]`` under ``aug``; with a mix, the partner's
    image index and the partner's stored augmentation (its own mix is ignored)."""

    image: int
    aug: Aug
    partner: tuple[int, Aug] | None = None


# ---------------------------------------------------------------------------------------
# crop + resize: Pillow's ImagingResample with a box, exactly


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``bicubic_filter`` (a = -0.5), the same operations in the same order."""
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _dev(a: Any, device: Any) -> torch.Tensor:
    """A host array or list on ``device``, without synchronising the current stream (a plain
    host-to-device ``.to()`` waits for the stream's queued work; this thread queues ahead)."""
    return torch.as_tensor(a).to(device, non_blocking=True)


def _axis_params(in_size: np.ndarray, in0: np.ndarray, in1: np.ndarray, out_size: int) -> dict[str, np.ndarray]:
    """The host half of :func:`resample_coeffs`: per view the box start, scale, support and
    1 / filter scale (float64, as Pillow's C computes them), the source length, and the first
    and one-past-last source index the taps read."""
    in0_h = np.asarray(in0, np.float32).astype(np.float64)
    scale_h = (np.asarray(in1, np.float32) - np.asarray(in0, np.float32)).astype(np.float64) / out_size
    fs_h = np.maximum(scale_h, 1.0)  # (double)(in1 - in0) / outSize above: the difference taken in float32
    support_h = 2.0 * fs_h
    size_h = np.asarray(in_size, np.int64)
    first = np.maximum(np.trunc((in0_h + 0.5 * scale_h) - support_h + 0.5).astype(np.int64), 0)
    last = np.minimum(np.trunc((in0_h + (out_size - 1 + 0.5) * scale_h) + support_h + 0.5).astype(np.int64), size_h)
    taps = int(np.ceil(support_h).max()) * 2 + 1 if len(scale_h) else 1
    return {"in0": in0_h, "scale": scale_h, "support": support_h, "inv": 1.0 / fs_h, "size": size_h, "taps": taps,
            "first": first, "last": last}


def resample_coeffs(in_size: np.ndarray, in0: np.ndarray, in1: np.ndarray, out_size: int, device: Any
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for a batch of boxes along one
    axis: ``in_size`` int [V] (source length), ``in0``/``in1`` float32 [V] (the box edge as C
    receives it). Returns, on ``device``, (first source index [V, S] int64, taps used [V, S]
    int64, fixed-point coefficients [V, S, T] float64 holding integers), and on the host each
    view's first and one-past-last source index (the same float64 arithmetic in numpy).
    (``replay_kernels.box_coeffs`` is the same arithmetic in one Triton launch.)"""
    a = _axis_params(in_size, in0, in1, out_size)
    T = a["taps"]
    in0_t, scale, support, inv = (_dev(a[k], device) for k in ("in0", "scale", "support", "inv"))
    xx = torch.arange(out_size, dtype=torch.float64, device=device)
    center = in0_t[:, None] + (xx + 0.5)[None, :] * scale[:, None]
    lo = torch.trunc(center - support[:, None] + 0.5).to(torch.int64).clamp(min=0)
    hi = torch.minimum(torch.trunc(center + support[:, None] + 0.5).to(torch.int64), _dev(a["size"], device)[:, None])
    n = hi - lo
    taps = torch.arange(T, device=device)
    pos = (lo[..., None] + taps).to(torch.float64)
    w = _bicubic(((pos - center[..., None]) + 0.5) * inv[:, None, None])
    w = torch.where(taps < n[..., None], w, torch.zeros_like(w))
    ww = torch.zeros_like(center)
    for t in range(T):  # summed tap by tap, as the C loop does
        ww = ww + w[..., t]
    k = torch.where(ww[..., None] != 0, w / torch.where(ww == 0, torch.ones_like(ww), ww)[..., None], w)
    kf = k * _ONE
    fixed = torch.where(k < 0, torch.trunc(-0.5 + kf), torch.trunc(0.5 + kf))
    return lo, n, fixed, a["first"], a["last"]


def _boxes(crops: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rule 2's box (x0*W, y0*H, (x0+w)*W, (y0+h)*H) in Python floats, then float32 as Pillow's
    ``_resize`` parses it. ``crops`` uint16-valued [V, 4], ``sizes`` [V, 2] = (W, H)."""
    f = crops.astype(np.float64) / Q
    W, H = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    x0, y0 = f[:, 0] * W, f[:, 1] * H
    x1, y1 = (f[:, 0] + f[:, 2]) * W, (f[:, 1] + f[:, 3]) * H
    return x0.astype(np.float32), y0.astype(np.float32), x1.astype(np.float32), y1.astype(np.float32)


def _fixed_round(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8`` of ``(1 << 21) + sum``: the 8-bit result, as float64 (in place; the
    scaling by 2^-22 is exact)."""
    return acc.mul_(1.0 / _ONE).add_(0.5).floor_().clamp_(0, 255)


def _groups(shapes: list[tuple[int, int]], waste: float = 1.25) -> list[list[int]]:
    """Images bucketed so that padding each bucket to its largest height and width costs at
    most ``waste`` x the bucket's pixels (same-size images: one bucket)."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], shapes[i]))
    out: list[list[int]] = []
    cur: list[int] = []
    hmax = wmax = area = 0
    for i in order:
        h, w = shapes[i]
        nh, nw = max(hmax, h), max(wmax, w)
        if cur and nh * nw * (len(cur) + 1) > waste * (area + h * w):
            out.append(cur)
            cur, hmax, wmax, area = [], 0, 0, 0
            nh, nw = h, w
        cur.append(i)
        hmax, wmax, area = nh, nw, area + h * w
    if cur:
        out.append(cur)
    return out


def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


_PILLOW_MAJOR = _pillow_major()


def vertical_first(height: int, width: int, size: int) -> bool:
    """Whether Pillow resizes a ``width x height`` source to ``size x size`` height first:
    Pillow >= 13 does when the height shrinks by more than twice what the width does (its
    ``ImagingResampleInner``; the box does not enter), earlier versions never. The order
    matters: each pass rounds to 8 bits."""
    if _PILLOW_MAJOR < 13:
        return False
    return (height - size) > 0 and (height - size) > (width - size) * 2


@dataclass(frozen=True)
class _Group:
    """A bucket of images for one dense resize: the views' rows in the output, their image
    slot and view slot in the bucket, views per image, and the source window's origin."""

    device: Any
    size: int
    vidx: torch.Tensor
    g: torch.Tensor
    s: torch.Tensor
    kmax: int
    r0: int
    c0: int


def _coeff_matrix(lo: torch.Tensor, k: torch.Tensor, geo: _Group, n_in: int, origin: int, *, groups: int = 0,
                  input_major: bool) -> torch.Tensor:
    """One axis's fixed-point taps as a dense float64 matrix, for a matrix product. Per image
    (``groups`` = G > 0): view (g, s)'s output position o is row/column ``s*S + o`` of image g's
    matrix, [G, n_in, kmax*S] (``input_major``) or [G, kmax*S, n_in]; per view (``groups`` = 0):
    [n, n_in, S] or [n, S, n_in]. Unused taps weigh 0 (their clamped index adds nothing)."""
    S, dev, kmax = geo.size, geo.device, geo.kmax
    n = len(geo.vidx)
    T = k.shape[2]
    pos = (lo[geo.vidx][..., None] + torch.arange(T, device=dev) - origin).clamp_(0, n_in - 1)  # [n, S, T]
    o = torch.arange(S, device=dev)[None, :, None]
    if groups:
        g, col = geo.g[:, None, None], geo.s[:, None, None] * S + o
        flat = (g * n_in + pos) * (kmax * S) + col if input_major else (g * (kmax * S) + col) * n_in + pos
        shape = (groups, n_in, kmax * S) if input_major else (groups, kmax * S, n_in)
    else:
        v = torch.arange(n, device=dev)[:, None, None]
        flat = (v * n_in + pos) * S + o if input_major else (v * S + o) * n_in + pos
        shape = (n, n_in, S) if input_major else (n, S, n_in)
    mat = torch.zeros(shape[0] * shape[1] * shape[2], dtype=torch.float64, device=dev)
    return mat.index_add_(0, flat.reshape(-1), k[geo.vidx].reshape(-1)).view(shape)


def _horizontal_then_vertical(src: torch.Tensor, geo: _Group, xs: tuple, ys: tuple) -> torch.Tensor:
    """Pillow's order up to 12 (and in 13 for most shapes): rows first, rounded to 8 bits, then
    columns. ``src`` float64 [G, Hr, 3, Wr]; returns uint8 [n, S, S, 3]."""
    G, Hr, _, Wr = src.shape
    S, n = geo.size, len(geo.vidx)
    kh = _coeff_matrix(*xs, geo, Wr, geo.c0, groups=G, input_major=True)  # [G, Wr, kmax*S]
    tmp = _fixed_round(torch.bmm(src.view(G, Hr * 3, Wr), kh)).view(G, Hr, 3, geo.kmax, S)
    inter = tmp[geo.g, :, :, geo.s].reshape(n, Hr, 3 * S)  # each view's rows: [n, Hr, 3*S]
    kv = _coeff_matrix(*ys, geo, Hr, geo.r0, input_major=False)  # [n, S, Hr]
    res = _fixed_round(torch.bmm(kv, inter))  # [n, S, 3*S]
    return res.view(n, S, 3, S).permute(0, 1, 3, 2).to(torch.uint8)


def _vertical_then_horizontal(src: torch.Tensor, geo: _Group, xs: tuple, ys: tuple) -> torch.Tensor:
    """Pillow 13's order for sources whose height shrinks much more than their width: columns
    first (over every source column), rounded to 8 bits, then rows."""
    G, Hr, _, Wr = src.shape
    S, n = geo.size, len(geo.vidx)
    kv = _coeff_matrix(*ys, geo, Hr, geo.r0, groups=G, input_major=False)  # [G, kmax*S, Hr]
    tmp = _fixed_round(torch.bmm(kv, src.view(G, Hr, 3 * Wr))).view(G, geo.kmax, S * 3, Wr)
    inter = tmp[geo.g, geo.s]  # [n, S*3, Wr]
    kh = _coeff_matrix(*xs, geo, Wr, geo.c0, input_major=True)  # [n, Wr, S]
    res = _fixed_round(torch.bmm(inter, kh))  # [n, S*3, S]
    return res.view(n, S, 3, S).permute(0, 1, 3, 2).to(torch.uint8)


_TRITON_FAILED: list[str] = []  # why the Triton kernels were given up in this process, if they were


def _give_up_triton(e: Exception, device: Any) -> None:
    """A Triton kernel failed to compile or launch on a GPU: warn once and use the torch path
    (the same bytes) from now on in this process. On the CPU (the interpreter, in tests) raise."""
    if device.type != "cuda":
        raise e
    import logging

    logging.getLogger(__name__).warning("Triton replay kernel failed (%s: %s): the torch path from now on",
                                        type(e).__name__, e)
    _TRITON_FAILED.append(f"{type(e).__name__}: {e}")


def _kernel_or_torch(kernel: Any, fallback: Any, device: Any) -> torch.Tensor:
    """``kernel()`` (Triton), or ``fallback()`` (torch, the same bytes) where it is not given or fails."""
    if kernel and not _TRITON_FAILED:
        try:
            return kernel()
        except Exception as e:  # noqa: BLE001 - a compile or launch failure
            _give_up_triton(e, device)
    return fallback()


def _resize_triton(images: Sequence[torch.Tensor], img_of: np.ndarray, views: np.ndarray, ax: tuple[dict, dict],
                   size: int) -> torch.Tensor:
    """Width-first views through the label stage's two resize kernels
    (:func:`silverlabel.inference.resize_crop_batch`'s ``_rows_pass`` and ``_cols_pass``: the
    same fixed-point arithmetic as Pillow, banded, reading the uint8 sources in place), each
    view its own "image" with this module's box coefficients (``replay_kernels.box_coeffs``,
    from ``ax`` = (rows', columns' :func:`_axis_params`)) in place of the kernels' own
    centre-crop ones. Returns uint8 [len(views), S, S, 3]."""
    from silverlabel.inference import _cols_pass, _rows_pass, triton
    from silverlabel.replay_kernels import box_coeffs

    dev = images[0].device
    n, S = len(views), size
    ys, xs = ax
    T = max(ys["taps"], xs["taps"])
    fmeta = np.empty((n, 2, 4), np.float64)
    for d, a in enumerate(ax):
        fmeta[:, d] = np.stack([a["in0"][views], a["scale"][views], a["support"][views], a["inv"][views]], 1)
    imeta2 = np.stack([ys["size"][views], xs["size"][views]], 1)
    row0, row1 = ys["first"][views], ys["last"][views]
    # per image: pointer, height, width, 3 strides; then per view the kernels' 9 fields after the pointer
    per_img = np.array([(t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), t.stride(1), t.stride(2))
                        for t in images], np.int64).reshape(len(images), 6)
    meta = np.zeros((n, 10), np.int64)
    meta[:, :6] = per_img[img_of[views]]
    meta[:, 6], meta[:, 7] = row0, row1 - row0
    # one host-to-device copy: the kernels' pointers and fields, and the coefficient inputs
    host = _dev(np.concatenate([meta[:, 0], meta[:, 1:].reshape(-1), imeta2.reshape(-1),
                                fmeta.reshape(-1).view(np.int64)]), dev)
    ptrs, imeta, sizes_t = host[:n], host[n:10 * n], host[10 * n:12 * n]
    fm = host[12 * n:].view(torch.float64)
    lo_t, k_t = box_coeffs(fm, sizes_t, T, S)
    # rows per view in the intermediate, rounded up so that its size (hundreds of MB per
    # batch) repeats from batch to batch and the caching allocator reuses its block: a new
    # size each batch made it free and allocate device memory, which waits for the GPU
    R = -(-int((row1 - row0).max()) // 64) * 64
    bx = triton.next_power_of_2(S)
    tmp = torch.empty((n, R, S, 3), dtype=torch.uint8, device=dev)
    _rows_pass[(n, triton.cdiv(R, 8))](ptrs, imeta, lo_t, k_t, tmp, R, T, S=S, BR=8, BX=bx, num_warps=8)
    out = torch.empty((n, S, S, 3), dtype=torch.uint8, device=dev)
    _cols_pass[(n, triton.cdiv(S, 8))](tmp, imeta, lo_t, k_t, out, R, T, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, S=S,
                                       NORMALIZE=False, BY=8, BX=bx, num_warps=8)
    return out


def resized_crops(images: Sequence[torch.Tensor], crops: Sequence[tuple[int, int]] | Sequence[Any],
                  size: int, method: str = "auto") -> torch.Tensor:
    """Rule 2 for many views: ``crops[v] = (image index, crop)`` with ``crop`` the stored
    (x0, y0, w, h) in 1/65535 of the source; returns uint8 [V, size, size, 3] equal to
    ``img.resize((size, size), BICUBIC, box=crop_box(...))``.

    ``method``: ``dense`` (float64 matrix products, any device), ``triton`` (the label stage's
    banded resize kernels for the width-first views; on a CUDA device, or on the CPU under
    ``TRITON_INTERPRET=1``), ``auto`` (triton on a CUDA device where Triton is present and has
    not failed in this process, else dense). The two give the same bytes."""
    device = images[0].device
    V = len(crops)
    out = torch.empty((V, size, size, 3), dtype=torch.uint8, device=device)
    if V == 0:
        return out
    img_of = np.array([int(c[0]) for c in crops], np.int64)
    boxes = np.array([c[1] for c in crops], np.int64).reshape(V, 4)
    shapes = [(int(t.shape[0]), int(t.shape[1])) for t in images]
    wh = np.array([(shapes[i][1], shapes[i][0]) for i in img_of], np.int64).reshape(V, 2)
    bx0, by0, bx1, by1 = _boxes(boxes, wh)
    xa = _axis_params(wh[:, 0], bx0, bx1, size)
    ya = _axis_params(wh[:, 1], by0, by1, size)
    used = sorted(set(img_of.tolist()))
    if method == "auto":
        from silverlabel.inference import triton

        method = "triton" if device.type == "cuda" and triton is not None and not _TRITON_FAILED else "dense"
    if method == "triton":
        wide = ~np.array([vertical_first(*sh, size) for sh in shapes], bool)[img_of]
        views = np.nonzero(wide)[0]
        if len(views):
            try:
                got = _resize_triton(images, img_of, views, (ya, xa), size)
                if len(views) == V:
                    out = got
                else:
                    out[_dev(views, device)] = got
                used = sorted({int(img_of[v]) for v in np.nonzero(~wide)[0]})
            except Exception as e:  # noqa: BLE001 - a compile or launch failure: the dense path gives the same bytes
                _give_up_triton(e, device)
    elif method != "dense":
        raise UserError(f"resize method must be auto, dense or triton, not {method!r}")
    if not used:
        return out
    # the dense path: the taps as float64 tensors; per view, the source columns [col0, col1)
    # and rows [row0, row1) its taps read
    xlo, xn, xk, col0, col1 = resample_coeffs(wh[:, 0], bx0, bx1, size, device)
    ylo, yn, yk, row0, row1 = resample_coeffs(wh[:, 1], by0, by1, size, device)
    for vfirst in (False, True):
        some = [i for i in used if vertical_first(*shapes[i], size) == vfirst]
        for group in _groups([shapes[i] for i in some]):
            imgs = [some[g] for g in group]
            views = [np.nonzero(img_of == i)[0] for i in imgs]
            allv = np.concatenate(views)
            c0, c1 = int(col0[allv].min()), int(col1[allv].max())
            r0, r1 = int(row0[allv].min()), int(row1[allv].max())
            src = torch.zeros((len(imgs), r1 - r0, 3, c1 - c0), dtype=torch.float64, device=device)  # [G, Hr, 3, Wr]
            for g, i in enumerate(imgs):
                h, w = shapes[i]
                part = images[i][r0:min(r1, h), c0:min(c1, w)]
                src[g, :part.shape[0], :, :part.shape[1]] = part.permute(0, 2, 1)
            slot_g = np.concatenate([np.full(len(v), g) for g, v in enumerate(views)])
            slot_k = np.concatenate([np.arange(len(v)) for v in views])
            vidx = _dev(allv, device)
            kmax = max(len(v) for v in views)
            geo = _Group(device, size, vidx, _dev(slot_g, device), _dev(slot_k, device), kmax, r0, c0)
            pass_ = _vertical_then_horizontal if vfirst else _horizontal_then_vertical
            out[vidx] = pass_(src, geo, (xlo, xk), (ylo, yk))
    return out


# ---------------------------------------------------------------------------------------
# RandAugment ops, grouped


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` ([n, S, S, 3] -> [n, S, S])."""
    xi = x.to(torch.int32)
    return (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """Per view and channel 256-bin histograms of uint8 [n, S, S, 3] -> int64 [n, 3, 256]."""
    n = x.shape[0]
    base = (torch.arange(n, device=x.device)[:, None, None, None] * 3 + torch.arange(3, device=x.device)) * 256
    idx = (x.to(torch.int64) + base).reshape(-1)
    h = torch.zeros(n * 3 * 256, dtype=torch.int64, device=x.device)  # not bincount: it syncs for its length
    return h.index_add_(0, idx, torch.ones_like(idx)).view(n, 3, 256)


@functools.cache
def _point_tables() -> np.ndarray:
    """uint8 [16 ops, 256 levels, 256]: the lookup table of every point op that needs no
    histogram (Invert, Posterize, Solarize, SolarizeAdd) at every stored level, as ``augment``'s
    ImageOps calls compute it (tests/test_replay_torch.py compares them all with Pillow); the
    identity for every other op. Made once, on the host: a batch's tables are then one copy."""
    ar = np.arange(256, dtype=np.int64)
    t = np.tile(ar, (len(OPS), 256, 1))
    for lv in range(256):
        m = lv / 255
        t[INVERT, lv] = 255 - ar
        t[POSTERIZE, lv] = ar & ~(2 ** (8 - (8 - int(round(4 * m)))) - 1)  # ImageOps.posterize(img, 8 - round(4 m))
        t[SOLARIZE, lv] = np.where(ar < 256 - int(round(256 * m)), ar, 255 - ar)  # solarize(img, 256 - round(256 m))
        t[SOLARIZE_ADD, lv] = np.where(ar < 128, np.minimum(ar + int(round(110 * m)), 255), ar)  # _solarize_add
    return t.astype(np.uint8)


def _lut_tables(x: torch.Tensor, ops: list[tuple[int, int, int]], rows: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per view, per channel lookup tables [n, 3, 256] (int64) of the point ops ``ops[i]``, for
    views ``x`` (or ``x[rows]``: only the views that need a histogram are gathered)."""
    dev = x.device
    op_ids = np.array([o for o, _s, _l in ops])
    levels = np.array([lv for _o, _s, lv in ops])
    lut = _dev(_point_tables()[op_ids, levels], dev).to(torch.int64)[:, None, :].repeat(1, 3, 1)
    hist_rows = np.nonzero(np.isin(op_ids, (AUTOCONTRAST, EQUALIZE)))[0]
    if len(hist_rows):
        ar = torch.arange(256, device=dev, dtype=torch.int64)
        hr = _dev(hist_rows, dev)
        h = _histograms(x[hr if rows is None else rows[hr]])  # [m, 3, 256]
        nz = h > 0
        ident = ar.expand_as(h)
        # AutoContrast: lo/hi = first/last non-empty bin; lut = int(ix * 255/(hi-lo) - lo * scale), clamped
        lo = torch.where(nz, ar, 256).amin(-1)
        hi = torch.where(nz, ar, -1).amax(-1)
        span = (hi - lo).clamp(min=1).to(torch.float64)
        scale = torch.full_like(span, 255.0) / span
        offset = -lo.to(torch.float64) * scale
        ac = torch.trunc(ar.to(torch.float64) * scale[..., None] + offset[..., None]).clamp(0, 255).to(torch.int64)
        ac = torch.where((hi <= lo)[..., None], ident, ac)
        # Equalize: step = (total - last non-empty bin's count) // 255; lut[i] = (step//2 + sum(h[:i])) // step
        total = h.sum(-1)
        last = h.gather(-1, hi.clamp(min=0)[..., None])[..., 0]
        step = (total - last) // 255
        excl = torch.cumsum(h, -1) - h
        eq = ((step // 2)[..., None] + excl) // step.clamp(min=1)[..., None]
        eq = torch.where(((nz.sum(-1) <= 1) | (step == 0))[..., None], ident, eq.clamp(0, 255))
        is_ac = _dev(op_ids[hist_rows] == AUTOCONTRAST, dev)[:, None, None]
        lut[hr] = torch.where(is_ac, ac, eq)
    return lut


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    base = (torch.arange(n, device=x.device)[:, None, None, None] * 3 + torch.arange(3, device=x.device)) * 256
    return lut.to(torch.uint8).reshape(-1)[(x.to(torch.int64) + base).reshape(-1)].view_as(x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH`` (3x3, 1 1 1 / 1 5 1 / 1 1 1, divisor 13) as Pillow's
    ``ImagingFilter3x3`` computes it for RGB: float32 taps, rows y+1, y, y-1 in that order,
    +0.5 then truncation; the border rows and columns copied."""
    k1, k5 = (_dev(k, x.device) for k in _smooth_taps())
    f = x.to(torch.float32)

    def row(r: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        return (r[:, :, :-2] * k1 + r[:, :, 1:-1] * mid) + r[:, :, 2:] * k1

    ss = torch.full_like(f[:, 1:-1, 1:-1], 0.5)
    ss = ss + row(f[:, 2:], k1)
    ss = ss + row(f[:, 1:-1], k5)
    ss = ss + row(f[:, :-2], k1)
    out = x.clone()
    out[:, 1:-1, 1:-1] = ss.clamp(0, 255).to(torch.uint8)  # (UINT8) of a value in [0.5, 255.5): truncation
    return out


def _blend(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``Image.blend(a, b, alpha)``: ``(UINT8)(a + alpha * (b - a))`` in float32, clipped to 0..255
    (alpha float32 [n])."""
    ai = a.to(torch.int32)
    d = (b.to(torch.int32) - ai).to(torch.float32)
    temp = ai.to(torch.float32) + alpha.view(-1, 1, 1, 1) * d
    return torch.trunc(temp).clamp_(0, 255).to(torch.uint8)


def _blend_op(x: torch.Tensor, ops: list[tuple[int, int, int]]) -> torch.Tensor:
    """Color / Contrast / Brightness / Sharpness for views ``x`` with ops ``ops[i]``."""
    dev = x.device
    op_ids = np.array([o for o, _s, _l in ops])
    alpha = _blend_alpha(ops, dev)
    degenerate = torch.empty_like(x)
    for op in (COLOR, CONTRAST, BRIGHTNESS, SHARPNESS):
        r = np.nonzero(op_ids == op)[0]
        if not len(r):
            continue
        rt = _dev(r, dev)
        xs = x[rt]
        if op == COLOR:
            d = _luma(xs).to(torch.uint8)[..., None].expand_as(xs)
        elif op == CONTRAST:  # int(mean of the luma histogram + 0.5)
            d = _contrast_greys(xs)[:, None, None, None].expand_as(xs)
        elif op == BRIGHTNESS:
            d = torch.zeros_like(xs)
        else:
            d = _smooth(xs)
        degenerate[rt] = d
    return _blend(degenerate, x, alpha)


def _affine_matrix(op: int, sign: int, level: int, size: int) -> tuple[float, ...]:
    """The 6 affine coefficients Pillow's ``transform`` receives for ``OPS[op]`` (output to
    input, as ``augment`` and ``Image.rotate`` compute them), or None for the identity."""
    m = level / 255
    s = sign
    if op == ROTATE:
        angle = (s * 30.0 * m) % 360.0
        if angle == 0:
            return None  # Image.rotate returns a copy
        w = h = size
        cx, cy = w / 2, h / 2
        a = -math.radians(angle)
        mat = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]

        def tr(x: float, y: float) -> tuple[float, float]:
            aa, b, c, d, e, f = mat
            return aa * x + b * y + c, d * x + e * y + f

        mat[2], mat[5] = tr(-cx - 0, -cy - 0)
        mat[2] += cx
        mat[5] += cy
        return tuple(mat)
    if op == SHEAR_X:
        return (1, s * 0.3 * m, 0, 0, 1, 0)
    if op == SHEAR_Y:
        return (1, 0, 0, s * 0.3 * m, 1, 0)
    if op == TRANSLATE_X:
        return (1, 0, s * 0.45 * m * size, 0, 1, 0)
    return (1, 0, 0, 0, 1, s * 0.45 * m * size)


def _affine(x: torch.Tensor, mats: np.ndarray) -> torch.Tensor:
    """Pillow's generic affine transform with the bilinear filter for every view (``mats``
    float64 [n, 6]): source point ``a0 (x+.5) + a1 (y+.5) + a2`` (and likewise y); outside
    [0, W) x [0, H) the fill grey 128; else bilinear in float64 over the clamped 2x2
    neighbours, truncated to uint8."""
    n, S = x.shape[0], x.shape[1]
    dev = x.device
    a = _dev(np.ascontiguousarray(mats, np.float64), dev)
    c = torch.arange(S, dtype=torch.float64, device=dev) + 0.5
    xi, yi = c[None, None, :], c[None, :, None]
    a0, a1, a2, a3, a4, a5 = (a[:, i].view(n, 1, 1) for i in range(6))
    xo = (a0 * xi + a1 * yi) + a2
    yo = (a3 * xi + a4 * yi) + a5
    inside = (xo >= 0) & (xo < S) & (yo >= 0) & (yo < S)
    xs, ys = xo - 0.5, yo - 0.5
    fx, fy = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - fx)[..., None], (ys - fy)[..., None]
    fx = fx.clamp(-2, S + 1).to(torch.int64)  # outside points are masked; keep the ints small
    fy = fy.clamp(-2, S + 1).to(torch.int64)
    x0, x1 = fx.clamp(0, S - 1), (fx + 1).clamp(0, S - 1)
    base = torch.arange(n, device=dev).view(n, 1, 1) * (S * S)
    r0, r1 = base + fy.clamp(0, S - 1) * S, base + (fy + 1).clamp(0, S - 1) * S
    pix = x.reshape(n * S * S, 3)

    def px(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return pix[(row + col).reshape(-1)].view(n, S, S, 3).to(torch.float64)

    p00, p01 = px(r0, x0), px(r0, x1)
    v1 = p00 + (p01 - p00) * dx
    p10, p11 = px(r1, x0), px(r1, x1)
    v2 = p10 + (p11 - p10) * dx
    v = v1 + (v2 - v1) * dy
    out = torch.trunc(v).clamp_(0, 255).to(torch.uint8)
    return torch.where(inside[..., None], out, torch.full_like(out, 128))


def _ops_method(x: torch.Tensor, method: str) -> str:
    if method == "auto":
        from silverlabel.replay_kernels import triton

        return "triton" if x.device.type == "cuda" and triton is not None and not _TRITON_FAILED else "torch"
    if method not in ("torch", "triton"):
        raise UserError(f"ops method must be auto, torch or triton, not {method!r}")
    return method


def _contrast_greys(xs: torch.Tensor) -> torch.Tensor:
    """Contrast's degenerate grey per view: ``int(mean of the luma histogram + 0.5)``."""
    lum = _luma(xs).reshape(xs.shape[0], -1).to(torch.int64)
    total = lum.sum(1).to(torch.float64)
    mean = total / torch.full_like(total, lum.shape[1])
    return torch.trunc(mean + 0.5).to(torch.uint8)


def _smooth_taps() -> tuple[torch.Tensor, torch.Tensor]:
    """SMOOTH's taps 1/13 and 5/13 as float32 division gives them (Pillow's ``float`` kernel)."""
    k1 = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    k5 = torch.tensor(5.0, dtype=torch.float32) / torch.tensor(13.0, dtype=torch.float32)
    return k1, k5


def _blend_alpha(ops: list[tuple[int, int, int]], dev: Any) -> torch.Tensor:
    """The factor ``1 + sign * 0.9 * m`` as Python computes it, then float32 as ImagingBlend takes it."""
    return _dev(np.array([1.0 + s * 0.9 * (lv / 255) for _o, s, lv in ops], np.float64).astype(np.float32), dev)


def _blend_kernel(x: torch.Tensor, r: torch.Tensor, ops: list[tuple[int, int, int]], out: torch.Tensor
                  ) -> torch.Tensor:
    """:func:`_blend_op` of views ``x[r]`` in one Triton pass (the degenerate made in the
    kernel), written into ``out`` at the same rows (returned)."""
    from silverlabel import replay_kernels as rk

    dev = x.device
    op_ids = np.array([o for o, _s, _l in ops])
    modes = np.searchsorted(np.array([COLOR, CONTRAST, BRIGHTNESS, SHARPNESS]), op_ids).astype(np.int32)
    greys = torch.zeros(len(ops), dtype=torch.int32, device=dev)
    cr = np.nonzero(op_ids == CONTRAST)[0]
    if len(cr):
        crt = _dev(cr, dev)
        greys[crt] = _contrast_greys(x[r[crt]]).to(torch.int32)
    k1, k5 = _smooth_taps()
    return rk.blend(x, r, _dev(modes, dev), greys, _blend_alpha(ops, dev), k1.item(), k5.item(), out=out)


def apply_ops(x: torch.Tensor, op_lists: Sequence[Sequence[tuple[int, int, int]]], method: str = "auto"
              ) -> torch.Tensor:
    """Rule 4 on uint8 [n, S, S, 3]: view ``i``'s ops ``op_lists[i]`` in order, the views grouped
    by op family at each step (lookup tables, blends, affine warps).

    ``method``: ``torch`` (elementwise torch, any device), ``triton`` (one pass per op family,
    :mod:`silverlabel.replay_kernels`; a CUDA device, or the CPU under ``TRITON_INTERPRET=1``),
    ``auto`` (triton on a CUDA device where Triton is present and has not failed in this
    process). The two give the same bytes."""
    S = x.shape[1]
    steps = max((len(o) for o in op_lists), default=0)
    dev = x.device
    tri = steps > 0 and _ops_method(x, method) == "triton"
    if tri:
        from silverlabel import replay_kernels as rk

        x = x.contiguous()
    for j in range(steps):
        here = [(i, tuple(o[j])) for i, o in enumerate(op_lists) if len(o) > j and o[j][0] != IDENTITY]
        for o, _s, _l in (op for _i, op in here):
            if not 0 <= o < len(OPS):
                raise UserError(f"unknown RandAugment op id {o}")
        if not here:
            continue
        # the kernels read this step's input and write a copy of it (each view has one op
        # per step, so the families' rows are disjoint); the torch path writes in place
        dst = x.clone() if tri and not _TRITON_FAILED else x
        lut_v = [(i, op) for i, op in here if op[0] in LUT_OPS]
        if lut_v:
            r = _dev([i for i, _ in lut_v], dev)
            lut = _lut_tables(x, [op for _, op in lut_v], r)
            _write(dst, r, _kernel_or_torch(tri and (lambda: rk.lookup(x, r, lut.to(torch.uint8), out=dst)),
                                            lambda: _apply_lut(x[r], lut), dev))
        blend_v = [(i, op) for i, op in here if op[0] in BLEND_OPS]
        if blend_v:
            r = _dev([i for i, _ in blend_v], dev)
            ops = [op for _, op in blend_v]
            _write(dst, r, _kernel_or_torch(tri and (lambda: _blend_kernel(x, r, ops, dst)),
                                            lambda: _blend_op(x[r], ops), dev))
        aff = [(i, _affine_matrix(op[0], op[1], op[2], S)) for i, op in here if op[0] in AFFINE_OPS]
        aff = [(i, m) for i, m in aff if m is not None]
        if aff:
            r = _dev([i for i, _ in aff], dev)
            mats = np.array([m for _, m in aff], np.float64)
            _write(dst, r, _kernel_or_torch(tri and (lambda: rk.affine(x, r, _dev(mats, dev), out=dst)),
                                            lambda: _affine(x[r], mats), dev))
        x = dst
    return x


def _write(dst: torch.Tensor, rows: torch.Tensor, got: torch.Tensor) -> None:
    """The torch path's result for ``rows`` written into ``dst``; nothing when a kernel wrote
    there itself (it returns ``dst``)."""
    if got is not dst:
        dst[rows] = got


# ---------------------------------------------------------------------------------------
# the whole replay


def _mix(a: torch.Tensor, b: torch.Tensor, mixes: Sequence[Any]) -> torch.Tensor:
    """Rule 5 for views ``a`` with partners ``b`` (uint8 [m, S, S, 3])."""
    out = a.clone()
    S_h, S_w = a.shape[1], a.shape[2]
    up = [i for i, m in enumerate(mixes) if m.mode == MIX_MIXUP]
    if up:
        r = _dev(up, a.device)
        lam = np.array([mixes[i].params[0] / Q for i in up], np.float64).astype(np.float32)
        lam_t = _dev(lam, a.device).view(-1, 1, 1, 1)
        one_minus = _dev((np.float32(1) - lam).astype(np.float32), a.device).view(-1, 1, 1, 1)
        v = a[r].to(torch.float32) * lam_t + b[r].to(torch.float32) * one_minus
        out[r] = torch.round(v).clamp_(0, 255).to(torch.uint8)  # round half to even, as np.rint
    for i, m in enumerate(mixes):
        if m.mode != MIX_CUTMIX:
            continue
        x0, y0, w, h = (v / Q for v in m.params)
        c0, c1 = int(round(x0 * S_w)), int(round((x0 + w) * S_w))
        r0, r1 = int(round(y0 * S_h)), int(round((y0 + h) * S_h))
        out[i, r0:r1, c0:c1] = b[i, r0:r1, c0:c1]
    return out


def replay_views(images: Sequence[torch.Tensor], views: Sequence[View], size: int) -> torch.Tensor:
    """Rules 2-5 for every view: ``images`` are decoded uint8 [H, W, 3] tensors on one device
    (what :func:`silverlabel.augment.decode` gives, or the GPU decoder's); returns uint8
    [len(views), size, size, 3] on that device, each row ``augment.replay`` of its view."""
    if not views:
        dev = images[0].device if images else torch.device("cpu")
        return torch.empty((0, size, size, 3), dtype=torch.uint8, device=dev)
    mixed = [i for i, v in enumerate(views) if v.aug.mix is not None]
    for i in mixed:
        if views[i].partner is None:
            raise UserError("a view that mixes needs its partner (image index, augmentation)")
    base: list[tuple[int, Aug]] = [(v.image, v.aug) for v in views]
    base += [(views[i].partner[0], views[i].partner[1]) for i in mixed]
    x = resized_crops(images, [(img, aug.crop) for img, aug in base], size)
    flips = [i for i, (_img, aug) in enumerate(base) if aug.flip]
    if flips:
        r = _dev(flips, x.device)
        x[r] = x[r].flip(2)
    x = apply_ops(x, [aug.ops for _img, aug in base])
    n = len(views)
    if mixed:
        r = _dev(mixed, x.device)
        x[r] = _mix(x[r], x[n:], [views[i].aug.mix for i in mixed])
    return x[:n]


def decode_cpu(data: bytes) -> torch.Tensor:
    """Rule 1 on the CPU: Pillow's RGB decode as a uint8 [H, W, 3] tensor
    (:func:`silverlabel.inference.rgb_tensor`: the same bytes, faster for JPEGs)."""
    from silverlabel.inference import rgb_tensor

    return rgb_tensor(data)


class _DeviceArray:
    """A GPU image reference ``(address, height, width, row, column, channel strides)`` from
    :class:`silverlabel.inference.GpuDecoder` as a CUDA array, for ``torch.as_tensor``."""

    def __init__(self, ref: tuple[int, int, int, int, int, int]):
        ptr, h, w, rs, cs, chs = (int(v) for v in ref)
        shape, strides = ((h, w, 3), (rs, cs, chs)) if chs else ((h, w), (rs, cs))
        self.__cuda_array_interface__ = {"shape": shape, "strides": strides, "typestr": "|u1",
                                         "data": (ptr, False), "version": 2}


def ref_tensor(ref: tuple[int, int, int, int, int, int], device: Any) -> torch.Tensor:
    """A decoder reference as a uint8 [H, W, 3] tensor view (gray planes read three times)."""
    t = torch.as_tensor(_DeviceArray(ref), device=device)
    return t if t.dim() == 3 else t[..., None].expand(t.shape[0], t.shape[1], 3)
