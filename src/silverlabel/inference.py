"""Batched teacher inference over WebDataset shards, on the CPU or a CUDA GPU.

The label stage (and reinforce) feed JPEG bytes in and get per-image probabilities in a
target label space out. Two paths share one contract:

- **CPU**: Pillow decodes on a thread pool (decoding releases the GIL) and timm's eval
  transform (resize shorter side to ``floor(size / crop_pct)``, center crop, normalize)
  prepares each image exactly as the teacher's pretrained config says.
- **GPU**, built around what the GPU can do at most (issue 15):

  1. a reader thread reads the batch's tar members (host I/O off the critical path);
  2. two decode threads decode baseline JPEGs on the GPU's **hardware JPEG engines**
     through nvImageCodec (backend ``HW_GPU_ONLY``; the engines are not the SMs, and the
     call releases the GIL), into reused buffers. A baseline JPEG the engines refuse falls
     back to nvJPEG on the SMs (``torchvision.io.decode_jpeg(list, device="cuda")``), then
     to Pillow; progressive JPEGs (nvJPEG would run their Huffman stage on the decode
     thread, one after another), CMYK/YCCK JPEGs (Pillow's conversion is the CPU path's)
     and other formats go to Pillow on host threads, started before the engines' batch.
     Each path is counted in :attr:`Labeler.decode_counts`. Without nvImageCodec or
     engines, nvJPEG decodes (in ``decode_procs`` worker processes when asked for);
  3. three Triton kernels resize, crop and normalize the whole batch at once, whatever the
     image sizes (:func:`resize_crop_batch`): Pillow's two-pass antialiased filter with
     its fixed-point coefficients (one small table kernel) and 8-bit intermediate,
     evaluated only for the pixels of the center crop, reading each decoded image in place
     through a pointer table (grayscale as one plane read three times), writing the
     model's dtype channels_last;
  4. the model runs with pure fp16 (or bf16) weights, BatchNorm and the classifier head in
     fp32, channels_last, captured with the probabilities, the label-space mapping and
     top-k in one CUDA graph
     per batch size (partial batches are padded, so every image goes through the same
     kernels: results depend on the device and batch size only); results come back
     through pinned buffers one batch behind.

    >>> tfm = EvalTransform(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    >>> tfm.scale_size
    256
    >>> p = resize_plan([480, 200], [640, 400], tfm)
    >>> p["new_h"].tolist(), p["new_w"].tolist(), p["top"].tolist(), p["left"].tolist()
    ([256, 256], [341, 512], [16, 16], [58, 144])
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from silverlabel.dataset import put_unless
from silverlabel.errors import UserError
from silverlabel.hostdecode import HostDecoder
from silverlabel.teachers import Teacher

log = logging.getLogger(__name__)

#: GPU precisions: the teacher's weights are cast to this dtype (BatchNorm stays fp32).
#: fp16 is the default: its 10-bit mantissa keeps top-1 near-ties as the fp32 CPU path
#: has them far more often than bf16's 7 bits (on 300 low-confidence photos under
#: autocast: fp16 matched every image, bf16 94.7%); tensor-core speed is the same on Hopper.
PRECISIONS = ("fp16", "bf16", "fp32")

#: ``label --decode auto`` (the default) decodes on the host, in the decode processes, when
#: the teacher's FLOPs per image times the number of those processes reach this, else on
#: the GPU (its JPEG engines). The host decode feeds the model when ``procs x r >= 1.25 x
#: (0.5 x peak) / flops``, with r the images/s one process decodes and the model at half the
#: GPU's bf16 peak: on the lent H200 (r ~ 500 for a 640x480 JPEG, peak ~780 TF/s) that is
#: ``flops x procs >= ~1e12``. There ViT-L/16 (123 GFLOP, 14 processes: 1.7e12) ran 11-15%
#: faster on the host (48-51.5% of the peak); ViT-B/16 (35 GFLOP: 0.5e12) ran -20% to +3%
#: and efficientnet_lite0 -29% to -6% against the engines (BENCHMARKS.md, "label on the
#: H200, eighth look"). On a slower GPU the host pays for lighter teachers too: pass
#: ``--decode host``. The rule reads nothing that changes run to run, so a run's choice is
#: the same every time on the same machine.
AUTO_HOST_FLOPS = 1e12
AUTO_HOST_MIN_PROCS = 8  # fewer host cores than this never feed a GPU's teacher

#: Pillow's filter supports (``ImagingResample``): bicubic (a = -0.5) and bilinear.
FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


@dataclass(frozen=True)
class EvalTransform:
    """A teacher's eval preprocessing, as numbers (from timm's data config)."""

    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_teacher(cls, teacher: Teacher, overrides: dict[str, Any] | None = None) -> EvalTransform:
        cfg = {**teacher.data_config, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        size = cfg["input_size"][-1] if "input_size" in cfg else cfg["size"]
        return cls(int(size), float(cfg.get("crop_pct", 0.875)), str(cfg.get("interpolation", "bicubic")),
                   tuple(cfg["mean"]), tuple(cfg["std"]))

    @property
    def scale_size(self) -> int:
        return math.floor(self.size / self.crop_pct)  # timm's rule

    def cpu(self):
        """The torchvision transform timm builds for evaluation (PIL in, tensor out)."""
        import timm.data

        return timm.data.create_transform(
            input_size=(3, self.size, self.size), interpolation=self.interpolation,
            crop_pct=self.crop_pct, mean=self.mean, std=self.std, is_training=False,
        )


def decode_rgb(data: bytes) -> Image.Image:
    """Pillow decode to RGB (raises on bad data): :func:`silverlabel.augment.decode`."""
    from silverlabel.augment import decode

    return decode(data)


def rgb_tensor(data: bytes, pin: bool = False, into: np.ndarray | None = None) -> Any:
    """Pillow's RGB pixels (:func:`silverlabel.augment.decode_rgb_array`: libjpeg-turbo without
    the GIL for JPEGs) as a uint8 [H, W, 3] CPU tensor: decoded into ``into`` (e.g. a slice of
    a batch's page-locked slab) when its shape is the image's, else, with ``pin``, into
    page-locked memory of its own (its copy to a GPU is then asynchronous)."""
    import torch

    from silverlabel.augment import decode_rgb_array

    held: list[Any] = []

    def alloc(shape: tuple[int, int, int]) -> np.ndarray:
        if into is not None and tuple(shape) == into.shape:
            return into
        if pin:
            held.append(torch.empty(shape, dtype=torch.uint8, pin_memory=True))
            return held[-1].numpy()
        return np.empty(shape, np.uint8)

    arr = decode_rgb_array(data, alloc)
    return held[-1] if held else torch.from_numpy(arr)


# ---------------------------------------------------------------------------------------
# batched resize + center crop + normalize on the GPU (Pillow's arithmetic, any sizes)


def _window(out_pos: np.ndarray, scale: np.ndarray, support: float, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` window [lo, hi) of input pixels for output ``out_pos``."""
    center = (out_pos + 0.5) * scale
    sup = support * np.maximum(scale, 1.0)
    lo = np.maximum(np.trunc(center - sup + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(center + sup + 0.5), size).astype(np.int64)
    return lo, hi


def resize_plan(heights: Sequence[int], widths: Sequence[int], tf: EvalTransform) -> dict[str, Any]:
    """Per image: the resized size (torchvision ``Resize(int)``: shorter side to
    ``tf.scale_size``), the center crop's offset (``CenterCrop``), the source rows the
    vertical pass reads, and the most filter taps any image needs."""
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    s = tf.scale_size
    short, long = np.minimum(h, w), np.maximum(h, w)
    new_long = np.trunc(s * long / short).astype(np.int64)  # int(s * long / short), as torchvision
    new_w = np.where(w <= h, s, new_long)
    new_h = np.where(w <= h, new_long, s)
    if (new_w < tf.size).any() or (new_h < tf.size).any():
        raise UserError(f"crop {tf.size} larger than the resized image (crop_pct > 1 is not supported)")
    top = np.round((new_h - tf.size) / 2.0).astype(np.int64)  # round half to even, as Python's round
    left = np.round((new_w - tf.size) / 2.0).astype(np.int64)
    scale_h, scale_w = h / new_h, w / new_w
    support = FILTER_SUPPORT[tf.interpolation if tf.interpolation in FILTER_SUPPORT else "bilinear"]
    ylo, _ = _window(top.astype(np.float64), scale_h, support, h)
    _, yhi = _window((top + tf.size - 1).astype(np.float64), scale_h, support, h)
    fs = np.maximum(np.maximum(scale_h, scale_w), 1.0)
    taps = int((np.ceil(support * fs) * 2 + 1).max()) if len(h) else 1
    return {"new_h": new_h, "new_w": new_w, "top": top, "left": left, "scale_h": scale_h, "scale_w": scale_w,
            "ylo": ylo, "rows": yhi - ylo, "taps": taps}


try:  # Triton ships with CUDA builds of torch; without it the GPU path is unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _filter(x, BICUBIC: tl.constexpr):
        x = tl.abs(x)
        if BICUBIC:  # Pillow's bicubic_filter, a = -0.5
            return tl.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0,
                            tl.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5, 0.0))
        return tl.where(x < 1.0, 1.0 - x, 0.0)

    @triton.jit
    def _coeff_pass(imeta, fmeta, lo_out, k_out, KMAX, S: tl.constexpr, SUP: tl.constexpr, BICUBIC: tl.constexpr,
                    BS: tl.constexpr):
        """Pillow's ``precompute_coeffs`` for the crop's output positions of image ``n`` along
        axis ``d`` (0: rows, 1: columns): first input index ``lo[n, d, i]`` and fixed-point
        coefficients ``k[n, d, t, i]`` (normalized in float64, rounded to 22 fractional bits)."""
        n = tl.program_id(0)
        d = tl.program_id(1)
        i = tl.arange(0, BS)
        m = i < S
        n_in = tl.load(imeta + n * 9 + d)  # H or W
        offset = tl.load(imeta + n * 9 + 7 + d)  # top or left: the crop in resized coordinates
        scale = tl.load(fmeta + n * 2 + d)
        fs = tl.maximum(scale, 1.0)
        center = ((offset + i).to(tl.float64) + 0.5) * scale
        lo = tl.maximum((center - SUP * fs + 0.5).to(tl.int64), 0)  # C's (int): toward zero
        hi = tl.minimum((center + SUP * fs + 0.5).to(tl.int64), n_in)
        ww = tl.zeros((BS,), tl.float64)
        for t in range(0, KMAX):
            w = _filter(((t + lo).to(tl.float64) - center + 0.5) / fs, BICUBIC)
            ww += tl.where(t < hi - lo, w, 0.0)
        ww = tl.where(ww == 0.0, 1.0, ww)
        row = (n * 2 + d).to(tl.int64)
        tl.store(lo_out + row * S + i, lo.to(tl.int32), mask=m)
        for t in range(0, KMAX):
            k = _filter(((t + lo).to(tl.float64) - center + 0.5) / fs, BICUBIC) / ww
            k = tl.where(t < hi - lo, k, 0.0) * 4194304.0  # 1 << 22
            tl.store(k_out + (row * KMAX + t) * S + i, tl.where(k < 0, k - 0.5, k + 0.5).to(tl.int32), mask=m)

    @triton.jit
    def _rows_pass(ptrs, imeta, lo_t, k_t, tmp, R, KMAX, S: tl.constexpr, BR: tl.constexpr, BX: tl.constexpr):
        """Horizontal pass: source rows [ylo, ylo + rows) -> tmp[n, r, x, c] (uint8), x in the crop."""
        n = tl.program_id(0)
        r = tl.program_id(1) * BR + tl.arange(0, BR)
        x = tl.arange(0, BX)
        src = tl.load(ptrs + n).to(tl.pointer_type(tl.uint8))
        W = tl.load(imeta + n * 9 + 1)
        sh = tl.load(imeta + n * 9 + 2)
        sw = tl.load(imeta + n * 9 + 3)
        sc = tl.load(imeta + n * 9 + 4)
        ylo = tl.load(imeta + n * 9 + 5)
        rows = tl.load(imeta + n * 9 + 6)
        xm = x < S
        m = (r < rows)[:, None] & xm[None, :]
        row_off = (ylo + r).to(tl.int64) * sh
        tab = (n * 2 + 1).to(tl.int64)
        lo = tl.load(lo_t + tab * S + x, mask=xm, other=0)
        a0 = tl.full((BR, BX), 2097152, tl.int32)  # 1 << 21: rounding
        a1 = tl.full((BR, BX), 2097152, tl.int32)
        a2 = tl.full((BR, BX), 2097152, tl.int32)
        for t in range(0, KMAX):
            k = tl.load(k_t + (tab * KMAX + t) * S + x, mask=xm, other=0)
            col = tl.minimum(lo + t, W - 1).to(tl.int64) * sw
            p = src + row_off[:, None] + col[None, :]
            a0 += tl.load(p, mask=m, other=0).to(tl.int32) * k[None, :]
            a1 += tl.load(p + sc, mask=m, other=0).to(tl.int32) * k[None, :]
            a2 += tl.load(p + 2 * sc, mask=m, other=0).to(tl.int32) * k[None, :]
        dst = tmp + ((n * R + r).to(tl.int64)[:, None] * S + x[None, :]) * 3
        tl.store(dst, tl.minimum(tl.maximum(a0 >> 22, 0), 255).to(tl.uint8), mask=m)
        tl.store(dst + 1, tl.minimum(tl.maximum(a1 >> 22, 0), 255).to(tl.uint8), mask=m)
        tl.store(dst + 2, tl.minimum(tl.maximum(a2 >> 22, 0), 255).to(tl.uint8), mask=m)

    @triton.jit
    def _cols_pass(tmp, imeta, lo_t, k_t, out, R, KMAX, m0, m1, m2, s0, s1, s2, S: tl.constexpr,
                   NORMALIZE: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
        """Vertical pass over tmp -> out[n, y, x, c] (NHWC memory = NCHW channels_last),
        as (v / 255 - mean) / std in out's dtype, or the uint8 pixel."""
        n = tl.program_id(0)
        y = tl.program_id(1) * BY + tl.arange(0, BY)
        x = tl.arange(0, BX)
        H = tl.load(imeta + n * 9 + 0)
        ylo = tl.load(imeta + n * 9 + 5)
        ym = y < S
        m = ym[:, None] & (x < S)[None, :]
        tab = (n * 2).to(tl.int64)
        lo = tl.load(lo_t + tab * S + y, mask=ym, other=0)
        a0 = tl.full((BY, BX), 2097152, tl.int32)
        a1 = tl.full((BY, BX), 2097152, tl.int32)
        a2 = tl.full((BY, BX), 2097152, tl.int32)
        for t in range(0, KMAX):
            k = tl.load(k_t + (tab * KMAX + t) * S + y, mask=ym, other=0)
            row = tl.minimum(tl.maximum(tl.minimum(lo + t, H - 1) - ylo, 0), R - 1)
            p = tmp + ((n * R + row).to(tl.int64)[:, None] * S + x[None, :]) * 3
            a0 += tl.load(p, mask=m, other=0).to(tl.int32) * k[:, None]
            a1 += tl.load(p + 1, mask=m, other=0).to(tl.int32) * k[:, None]
            a2 += tl.load(p + 2, mask=m, other=0).to(tl.int32) * k[:, None]
        v0 = tl.minimum(tl.maximum(a0 >> 22, 0), 255)
        v1 = tl.minimum(tl.maximum(a1 >> 22, 0), 255)
        v2 = tl.minimum(tl.maximum(a2 >> 22, 0), 255)
        dst = out + ((n * S + y).to(tl.int64)[:, None] * S + x[None, :]) * 3
        if NORMALIZE:  # torchvision's to_tensor (v / 255) then Normalize, in float32
            tl.store(dst, ((v0.to(tl.float32) / 255.0 - m0) / s0).to(out.dtype.element_ty), mask=m)
            tl.store(dst + 1, ((v1.to(tl.float32) / 255.0 - m1) / s1).to(out.dtype.element_ty), mask=m)
            tl.store(dst + 2, ((v2.to(tl.float32) / 255.0 - m2) / s2).to(out.dtype.element_ty), mask=m)
        else:
            tl.store(dst, v0.to(tl.uint8), mask=m)
            tl.store(dst + 1, v1.to(tl.uint8), mask=m)
            tl.store(dst + 2, v2.to(tl.uint8), mask=m)


def resize_crop_batch(refs: Sequence[tuple[int, int, int, int, int, int]], tf: EvalTransform, device: Any,
                      dtype: Any = None):
    """Resize (shorter side to ``tf.scale_size``), center-crop and normalize a batch of
    images of any sizes in three kernel launches (filter coefficients, then the two passes);
    returns ``(N, 3, S, S)`` channels_last in
    ``dtype`` (``None``: uint8 pixels, not normalized).

    ``refs[i] = (address, height, width, row stride, column stride, channel stride)`` of an
    8-bit RGB image in device memory (strides in bytes; a channel stride of 0 reads a gray
    plane as RGB). The caller keeps the images alive until the work on the current stream
    is done. The pixels equal Pillow's ``resize(BICUBIC)`` + crop, the CPU path's, up to
    float64 rounding of the filter weights (no difference seen in the tests).
    """
    import torch

    if triton is None:
        raise UserError("the GPU path needs Triton (it comes with CUDA builds of torch)")
    meta = np.asarray(refs, np.int64).reshape(-1, 6)
    n, size = len(meta), tf.size
    out = torch.empty((n, size, size, 3), dtype=dtype or torch.uint8, device=device)
    if n == 0:
        return out.permute(0, 3, 1, 2)
    plan = resize_plan(meta[:, 1], meta[:, 2], tf)
    imeta = np.stack([meta[:, 1], meta[:, 2], meta[:, 3], meta[:, 4], meta[:, 5], plan["ylo"], plan["rows"],
                      plan["top"], plan["left"]], 1)
    host = torch.from_numpy(np.concatenate([meta[:, 0], imeta.reshape(-1)]))
    gpu = host.to(device, non_blocking=True)
    ptrs, imeta_d = gpu[:n], gpu[n:]
    fmeta = torch.from_numpy(np.stack([plan["scale_h"], plan["scale_w"]], 1).reshape(-1)).to(device, non_blocking=True)
    R, taps = int(plan["rows"].max()), plan["taps"]
    bicubic = tf.interpolation == "bicubic"
    sup = FILTER_SUPPORT["bicubic" if bicubic else "bilinear"]
    bx = triton.next_power_of_2(size)
    lo_t = torch.empty((n, 2, size), dtype=torch.int32, device=device)
    k_t = torch.empty((n, 2, taps, size), dtype=torch.int32, device=device)
    _coeff_pass[(n, 2)](imeta_d, fmeta, lo_t, k_t, taps, S=size, SUP=sup, BICUBIC=bicubic, BS=bx, num_warps=4)
    tmp = torch.empty((n, R, size, 3), dtype=torch.uint8, device=device)
    _rows_pass[(n, triton.cdiv(R, 8))](ptrs, imeta_d, lo_t, k_t, tmp, R, taps, S=size, BR=8, BX=bx, num_warps=8)
    mean, std = tf.mean, tf.std
    _cols_pass[(n, triton.cdiv(size, 8))](tmp, imeta_d, lo_t, k_t, out, R, taps, mean[0], mean[1], mean[2], std[0],
                                        std[1], std[2], S=size, NORMALIZE=dtype is not None, BY=8, BX=bx,
                                        num_warps=8)
    return out.permute(0, 3, 1, 2)


def tensor_ref(t) -> tuple[int, int, int, int, int, int]:
    """:func:`resize_crop_batch`'s reference to a uint8 image tensor: (3, H, W) or (H, W, 3)."""
    if t.shape[0] == 3 and t.dim() == 3 and t.shape[-1] != 3:
        return (t.data_ptr(), t.shape[1], t.shape[2], t.stride(1), t.stride(2), t.stride(0))
    return (t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), t.stride(1), t.stride(2))


# ---------------------------------------------------------------------------------------
# decoding on the GPU: hardware engines, then nvJPEG on the SMs, then Pillow

#: decode paths, in the order they are tried (the keys of ``decode_counts``)
DECODE_PATHS = ("hw", "nvjpeg", "pillow", "failed")


def hardware_jpeg_decoder(device_index: int) -> Any:
    """An nvImageCodec decoder on the GPU's hardware JPEG engines, or None (no package, no
    engines). Only ``HW_GPU_ONLY``: the hybrid ``GPU_ONLY`` backend (Huffman on the host)
    failed to create on the H200 where this was measured, and nvJPEG through torchvision
    covers what the engines refuse."""
    _preload_nvjpeg()
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    backends = [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]
    try:  # libjpeg-turbo's (so Pillow's) chroma upsampling, where the decoder offers it
        dec = nvimgcodec.Decoder(device_id=device_index, backends=backends, options=":fancy_upsampling=1")
    except Exception:
        dec = None
    try:
        dec = dec or nvimgcodec.Decoder(device_id=device_index, backends=backends)
        params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                         allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.I_RGB)
    except Exception as e:  # no engines on this GPU, or the library refused
        log.info("no hardware JPEG decoder: %s: %s", type(e).__name__, e)
        return None
    return nvimgcodec, dec, params


def _preload_nvjpeg() -> None:
    """Load libnvjpeg from the ``nvidia-nvjpeg`` wheel (``nvidia/cu13/lib``) where it is on
    ``sys.path`` but not on the loader's path, so that nvImageCodec's plugin finds it."""
    import ctypes
    import glob
    import os
    import sys

    for base in sys.path:
        for path in sorted(glob.glob(os.path.join(base or ".", "nvidia", "cu*", "lib", "libnvjpeg.so.*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


class GpuDecoder:
    """Bytes -> 8-bit RGB images on one GPU: baseline JPEGs down the chain hardware engines
    -> nvJPEG -> Pillow, everything else (progressive, CMYK, other formats) on Pillow
    threads; ``decode`` returns :func:`resize_crop_batch` references.

    With ``host`` every image is decoded on the host threads instead (Pillow's pixels, JPEGs
    by libjpeg-turbo without the GIL, into page-locked memory, then one asynchronous copy
    each): the CPU path's pixels, reproducible, and no decode work on the GPU at all.

    ``use_hw`` can be switched off (the benchmark does, to compare). The hardware path is
    dropped for good if it decodes none of the first 64 JPEGs offered to it. With ``reuse``
    the engines decode into the buffers of the batch decoded ``SLOTS`` batches earlier on
    this decoder (after an event says this stream's work on them is done) instead of new
    allocations each batch, each image into a buffer of its own height, width and channel
    count, or the whole batch into new buffers. (Buffers of other shapes are not safe:
    reinforce on bench/multigpu.py's toy set, whose photos vary in size and colour, changed
    about 1% of its samples from one run to the next, by the images decoded before them.)"""

    SLOTS = 8

    def __init__(self, device: Any, use_hw: bool = True, pool: ThreadPoolExecutor | None = None, host: bool = False):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.pool = pool or ThreadPoolExecutor(4)
        self.host = host
        self._pin = self.device.type == "cuda"
        self.hw = hardware_jpeg_decoder(self.device.index or 0) if use_hw and not host else None
        self.use_hw = self.hw is not None
        self.counts: Counter = Counter()
        self._hw_tried = 0
        self.reuse = True
        self._slots: list[dict[tuple[int, int, int], list[Any]]] = [{} for _ in range(self.SLOTS)]
        self._slot_done: list[Any] = [None] * self.SLOTS
        self._batch = 0

    def decode(self, blobs: Sequence[bytes]) -> tuple[list[Any], list[str | None], list[Any]]:
        """Decode on the current CUDA stream: (refs, errors, keepalive); a failed image has
        ref None and its error. Keep ``keepalive`` until the stream's work on the refs is done."""
        n = len(blobs)
        refs: list[Any] = [None] * n
        errors: list[str | None] = [None] * n
        keep: list[Any] = []
        kinds = [jpeg_kind(b) for b in blobs]
        # Progressive JPEGs (nvJPEG runs their Huffman stage on this thread, one image after
        # another), CMYK/YCCK (Pillow's conversion is the CPU path's) and other formats:
        # Pillow on host threads, in parallel with the GPU decoding the rest.
        on_host = {j: self.pool.submit(rgb_tensor, blobs[j], self._pin) for j in range(n)
                   if self.host or kinds[j] != "baseline"}
        baseline = [] if self.host else [j for j in range(n) if kinds[j] == "baseline"]
        if baseline and self.use_hw:
            self._decode_hw(blobs, baseline, refs, keep)
        self._decode_nvjpeg(blobs, [j for j in baseline if refs[j] is None], refs, keep)
        for j in baseline:
            if refs[j] is None:
                on_host[j] = self.pool.submit(rgb_tensor, blobs[j], self._pin)
        for j, fut in sorted(on_host.items()):
            try:
                h = fut.result()
            except Exception as e:
                errors[j] = f"{type(e).__name__}: {e}"
                self.counts["failed"] += 1
                continue
            t = h.to(self.device, non_blocking=True)  # from page-locked memory: queued on this stream
            refs[j] = tensor_ref(t)
            keep += [t, h]  # the host pixels too, until the copy has run
            self.counts["pillow"] += 1
        return refs, errors, keep

    def _buffers(self, k: int, shapes: list[tuple[int, int, int]]) -> list[Any] | None:
        """Slot ``k``'s buffers, one per image of the same (height, width, channels), or None
        when the slot lacks one for any image (the batch then gets new buffers)."""
        free = {shape: list(ims) for shape, ims in self._slots[k].items()}
        out = []
        for shape in shapes:
            ims = free.get(shape)
            if not ims:
                return None
            out.append(ims.pop())
        return out

    def _decode_hw(self, blobs: Sequence[bytes], idx: list[int], refs: list[Any], keep: list[Any]) -> None:
        nvimgcodec, dec, params = self.hw
        torch = self.torch
        stream = torch.cuda.current_stream(self.device)
        k = self._batch % self.SLOTS
        if self._batch:  # everything that reads the previous batch's images is on this stream by now
            ev = torch.cuda.Event(blocking=True)  # waited on below: the thread sleeps, its core free
            ev.record(stream)
            self._slot_done[(self._batch - 1) % self.SLOTS] = ev
        self._batch += 1
        streams = [nvimgcodec.CodeStream(blobs[j]) for j in idx]
        shapes = [(s.height, s.width, s.num_channels) for s in streams]
        reuse = self._buffers(k, shapes) if self.reuse else None
        if reuse is not None and self._slot_done[k] is not None:
            self._slot_done[k].synchronize()
        try:
            images = dec.decode(streams, images=reuse, params=params, cuda_stream=stream.cuda_stream)
        except Exception as e:
            if reuse is not None:  # buffers refused: decode into new ones from now on
                log.warning("reusing decode buffers failed (%s: %s)", type(e).__name__, e)
                self.reuse, reuse = False, None
            try:
                images = dec.decode(streams, params=params, cuda_stream=stream.cuda_stream)
            except Exception as e:
                log.warning("hardware JPEG decode failed for a batch (%s: %s); falling back", type(e).__name__, e)
                images = [None] * len(idx)
        if self.reuse:
            slot: dict[tuple[int, int, int], list[Any]] = {}
            for shape, im in zip(shapes, images):
                if im is not None:
                    slot.setdefault(shape, []).append(im)
            self._slots[k] = slot
        got = 0
        for j, im in zip(idx, images):
            if im is None:
                continue
            cai = im.__cuda_array_interface__
            shape = cai["shape"]
            h, w = shape[:2]
            c = shape[2] if len(shape) == 3 else 1
            strides = cai.get("strides") or ((w * c, c, 1) if len(shape) == 3 else (w, 1))
            refs[j] = (cai["data"][0], h, w, strides[0], strides[1], strides[2] if c == 3 else 0)
            got += 1
        keep.append((streams, images))  # the code streams too: the engines read them asynchronously
        self.counts["hw"] += got
        self._hw_tried += len(idx)
        if self.counts["hw"] == 0 and self._hw_tried >= 64:
            log.warning("the hardware JPEG decoder decoded none of %d JPEGs: not using it", self._hw_tried)
            self.use_hw = False

    def _decode_nvjpeg(self, blobs: Sequence[bytes], idx: list[int], refs: list[Any], keep: list[Any]) -> None:
        if not idx:
            return
        import torchvision.io as tio

        torch = self.torch
        datas = [torch.frombuffer(bytearray(blobs[j]), dtype=torch.uint8) for j in idx]
        try:
            images = tio.decode_jpeg(datas, device=self.device, mode=tio.ImageReadMode.RGB)
        except Exception:  # one bad image fails the batch call: find it
            images = []
            for d in datas:
                try:
                    images.append(tio.decode_jpeg(d, device=self.device, mode=tio.ImageReadMode.RGB))
                except Exception:
                    images.append(None)
        for j, im in zip(idx, images):
            if im is not None and im.dim() == 3 and im.shape[0] == 3:
                refs[j] = tensor_ref(im)
                keep.append(im)
                self.counts["nvjpeg"] += 1


_SOF = {0xC0: "baseline", 0xC1: "baseline", 0xC2: "progressive"}  # others (lossless, arithmetic): Pillow


def jpeg_kind(data: bytes) -> str:
    """``baseline`` (what the engines decode: Huffman, 8-bit, 1 or 3 components),
    ``progressive``, or ``other`` (CMYK/YCCK, 12-bit, arithmetic coding, not a JPEG), read
    from the frame header without decoding.

    >>> jpeg_kind(b"PNG")
    'other'
    """
    if data[:2] != b"\xff\xd8":
        return "other"
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return "other"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > n:
                return "other"
            ok = data[pos + 4] == 8 and data[pos + 9] in (1, 3)
            return _SOF.get(marker, "other") if ok else "other"
        pos += 2 + length
    return "other"


def read_blobs(path: str, locs: Sequence[tuple[int, int]]) -> list[bytes]:
    """Member bytes at (offset, size) locations of one file, in order: neighbours in one read
    (:func:`silverlabel.formats.wds.read_members`). A member cut short by the file's end
    comes back short (or empty) and fails its decode, counted like any other."""
    from silverlabel.formats.wds import read_members

    fd = os.open(path, os.O_RDONLY)
    try:
        return read_members(fd, locs, strict=False)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=8)
def _mean_std_255(mean: tuple[float, ...], std: tuple[float, ...], device: Any) -> tuple[Any, Any]:
    """Mean and std x 255 as (1, 3, 1, 1) float32 tensors on ``device``, made once."""
    import torch

    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(device) for v in (mean, std))


def normalize_batch(x, tf: EvalTransform):
    """uint8/float (N,3,S,S) in 0..255 -> normalized float32, channels_last.

    The mean and std tensors are made once per device: made per call, their host-to-device
    copy synchronised the stream, so the caller waited for every kernel queued before it
    (reinforce's main thread spent ~40% of its time there on an H200, py-spy)."""
    import torch

    mean, std = _mean_std_255(tuple(tf.mean), tuple(tf.std), x.device)
    x = x.float()
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def producer_stream(device: Any) -> Any:
    """A CUDA stream for the decode/resize side of a GPU pipeline, at the highest priority.

    The producer is a chain of small, dependent steps (bitstream copies, decode, colour
    conversion, resize kernels, host synchronisations between them); the model is a few long
    kernels. At high priority the producer's blocks are scheduled first wherever SMs free up,
    at no cost to the model. It is not enough on its own: next to a ViT-B/16 a decode loop
    kept 8-13% of its rate alone at either priority on an H200, because the model's kernels
    hold every SM for as long as they run (bench/label_overlap.py, BENCHMARKS.md)."""
    import torch

    _, high = torch.cuda.Stream.priority_range()
    return torch.cuda.Stream(device, priority=high)


def model_stream(device: Any, reserve_sms: int) -> tuple[Any, Any, int]:
    """(stream, green context or None, SMs the model gets) for a GPU pipeline's model.

    With ``reserve_sms > 0`` the stream belongs to a CUDA green context of all SMs but
    ``reserve_sms``. Why one would: the model's kernels fill every SM they may use for as
    long as they run, so a decode loop next to a model loop waits behind them at any stream
    priority (on an H200 next to a ViT-B/16 the JPEG decode kept 8% of its rate; with 32 SMs
    left to it, 52%, the model 83% of its full-GPU rate: bench/label_overlap.py). In
    ``label`` end to end it measured no gain (BENCHMARKS.md), so it is off by default.
    Without green contexts (torch < 2.11, CUDA < 12.8) the model gets a plain stream."""
    import torch

    total = torch.cuda.get_device_properties(device).multi_processor_count
    if 0 < reserve_sms < total:
        try:
            from torch.cuda.green_contexts import GreenContext

            ctx = GreenContext.create(num_sms=total - reserve_sms, device_id=torch.device(device).index or 0)
            return ctx.Stream(), ctx, total - reserve_sms
        except Exception as e:  # noqa: BLE001 - an optional speed-up: say why and go on
            log.info("no green context for the model (%s: %s): it shares every SM with the decode",
                     type(e).__name__, e)
    return torch.cuda.Stream(device), None, total


def decode_worker(device: str, specs: list[EvalTransform], tasks: Any, results: Any, use_hw: bool = False) -> None:
    """A decode process of the GPU path (on GPUs without JPEG engines by default): (id,
    path, keys, locs) in, uint8 GPU crops out over CUDA IPC (no host round trip). Each process has its
    own nvJPEG decoder and interpreter, so decoding scales past torchvision's single locked
    decoder and never holds the model's GIL."""
    import torch

    torch.cuda.set_device(torch.device(device))
    torch.cuda.set_stream(producer_stream(device))
    decoder = GpuDecoder(device, use_hw=use_hw)
    sent: list = []  # keep recently sent tensors alive until the consumer has used them
    while True:
        task = tasks.get()
        if task is None:
            break
        bid, path, keys, locs = task
        try:
            refs, errors, keep = decoder.decode(read_blobs(path, locs))
            ok = [j for j, e in enumerate(errors) if e is None]
            failed = [(keys[j], errors[j]) for j in range(len(keys)) if errors[j] is not None]
            crops = [resize_crop_batch([refs[j] for j in ok], tf, device) for tf in specs] if ok else []
            torch.cuda.current_stream().synchronize()
            del keep
            results.put((bid, [keys[j] for j in ok], crops, failed, dict(decoder.counts), None))
            decoder.counts.clear()
            sent.append(crops)
            del sent[:-8]
        except Exception as e:  # reported to the driver, which fails the shard loudly
            results.put((bid, None, None, None, None, f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------------------------------
# teachers -> probabilities in the target space


def _largest_batch(sizes: dict[str, tuple[int, int]] | None, batch: int) -> int | None:
    """Bytes of RGB pixels the largest batch of ``batch`` images can need, from each key's
    (height, width) in file order: the largest run of ``batch`` neighbours, plus the largest
    image (a key the tar lacks shifts a batch by one); None without sizes."""
    if not sizes:
        return None
    px = np.array([h * w * 3 for h, w in sizes.values()], np.int64)
    runs = np.cumsum(np.concatenate([[0], px]))
    n = min(batch, len(px))
    return int((runs[n:] - runs[:-n]).max() + px.max())


def flops_per_image(labeler: "Labeler") -> float:
    """FLOPs of one image through every teacher of ``labeler`` at its input size (counted by
    ``torch.utils.flop_counter`` on a batch of one, on the device; a compiled teacher is
    counted on its module, so nothing is compiled for batch 1)."""
    torch = labeler.torch
    from torch.utils.flop_counter import FlopCounterMode

    total = 0.0
    for model, tf in zip(labeler.models, labeler.transforms):
        model = getattr(model, "_orig_mod", model)
        x = torch.zeros(1, 3, tf.size, tf.size, device=labeler.device, dtype=labeler.dtype)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model(x.contiguous(memory_format=torch.channels_last))
        total += fc.get_total_flops()
    return float(total)


def host_feeds(flops: float, procs: int) -> bool:
    """``--decode auto``'s rule: whether ``procs`` host decode processes keep a teacher of
    ``flops`` per image fed (:data:`AUTO_HOST_FLOPS`, :data:`AUTO_HOST_MIN_PROCS`)."""
    return procs >= AUTO_HOST_MIN_PROCS and flops * procs >= AUTO_HOST_FLOPS


def auto_host_decode(labeler: "Labeler", procs: int) -> bool:
    """``--decode auto``'s choice for ``labeler`` with ``procs`` decode processes: the host
    when the teachers are slow enough for those processes to keep them fed
    (:func:`host_feeds`), else the GPU's decoders; logged."""
    if procs < AUTO_HOST_MIN_PROCS:
        log.info("--decode auto: gpu (%d host decode processes, fewer than %d)", procs, AUTO_HOST_MIN_PROCS)
        return False
    flops = flops_per_image(labeler)
    host = host_feeds(flops, procs)
    log.info("--decode auto: %s (%.1f GFLOP per image x %d decode processes = %.2g, %s %.0g)",
             "host" if host else "gpu", flops / 1e9, procs, flops * procs, ">=" if host else "<", AUTO_HOST_FLOPS)
    return host


def host_turn(i: int, share: float) -> bool:
    """Whether batch ``i`` of a run goes to the host decode with ``--decode both``: a share
    ``share`` of the batches, evenly spread (0.5: every other one)."""
    return math.floor((i + 1) * share) > math.floor(i * share)


def split_batches(batches: Iterable[Any], share: float, abort: threading.Event
                  ) -> tuple[Any, Iterator[Any], Iterator[Any]]:
    """(route, host batches, GPU batches): ``route()``, run on a thread of its own, deals
    ``batches`` out to the two iterators by index (:func:`host_turn`), each consumed by a
    thread of its own; both end when ``batches`` does, or when ``abort`` is set."""
    end = object()
    host_q: queue.Queue = queue.Queue(maxsize=4)
    gpu_q: queue.Queue = queue.Queue(maxsize=4)

    def route() -> None:
        try:
            for i, b in enumerate(batches):
                if not put_unless(host_q if host_turn(i, share) else gpu_q, b, abort):
                    return
        finally:
            put_unless(host_q, end, abort)
            put_unless(gpu_q, end, abort)

    def dealt(q: queue.Queue) -> Iterator[Any]:
        while (item := _get(q, abort)) is not end and item is not None:
            yield item

    return route, dealt(host_q), dealt(gpu_q)


def _get(q: queue.Queue, abort: threading.Event) -> Any:
    """``q.get`` that gives up (None) when the consumer has gone."""
    while not abort.is_set():
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue
    return None


class _Graph:
    """The per-batch tail on the GPU (every teacher, probabilities, mapping, average,
    top-k) captured as one CUDA graph for batch size ``B``: smaller batches are padded (the
    rows past ``n`` hold the previous batch's images and are ignored), so every image goes
    through the same kernels whatever batch it lands in."""

    def __init__(self, labeler: Labeler, B: int):
        torch = labeler.torch
        with torch.cuda.device(labeler.device):  # capture on the model's GPU, not the current one
            self._capture(labeler, B)

    def _capture(self, labeler: Labeler, B: int) -> None:
        torch = labeler.torch
        self.B = B
        self.inputs = [torch.zeros((B, 3, tf.size, tf.size), dtype=labeler.dtype, device=labeler.device)
                       .contiguous(memory_format=torch.channels_last) for tf in labeler.transforms]
        side = torch.cuda.Stream(labeler.device)
        side.wait_stream(torch.cuda.current_stream(labeler.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: cuDNN/cuBLAS handles, workspaces, compilation
                labeler.forward(self.inputs)
        torch.cuda.current_stream(labeler.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.idx, self.vals = labeler.forward(self.inputs)

    def __call__(self, xs: Sequence[Any]):
        n = xs[0].shape[0]
        for buf, x in zip(self.inputs, xs):
            buf[:n].copy_(x)
        self.graph.replay()
        return self.idx[:n], self.vals[:n]


class Outputs:
    """:meth:`Labeler.classify_async`'s outputs: copies to the host queued on the current stream
    (page-locked, so the copies do not wait; a CUDA graph's output buffers are copied before
    its next replay, in stream order), and an event after them. ``result()`` waits for the
    event (without the GIL) and gives (top indices int32, top probs float32, embeddings
    float16 or None) as numpy arrays."""

    def __init__(self, device: Any, *tensors: Any):
        import torch

        cuda = device.type == "cuda"
        self._host = [None if t is None else t.to("cpu", non_blocking=cuda) for t in tensors]
        self._event = None
        if cuda:  # blocking: result() sleeps until the copies are done instead of spinning a core
            self._event = torch.cuda.Event(blocking=True)
            self._event.record()

    def wait(self) -> None:
        """Until the outputs are on the host (the thread sleeps, without the GIL)."""
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        self.wait()
        idx, vals, *emb = self._host
        return idx.numpy(), vals.numpy(), (emb[0].numpy() if emb and emb[0] is not None else None)


class Labeler:
    """One or more teachers (an ensemble averages probabilities) mapped to ``target_space``.

    ``run(batches)`` takes an iterable of ``(keys, file, [(offset, size), ...])`` and yields
    ``(keys_ok, top_indices[N,k] int32, top_probs[N,k] float32, failed: list[(key, error)])``.

    On the GPU, ``decode_procs`` worker processes decode with nvJPEG only where the GPU has
    no hardware JPEG engines (with engines, decoding stays in this process: the engines do
    the work, and kernels from other processes would time-slice with the model's);
    ``gpu_decode_threads`` caps the decode threads (2 at most: one builds a batch while the
    other's is on the engines; more only contend for the GIL). ``cuda_graphs=False`` runs
    the model eagerly. ``reserve_sms`` SMs are kept from the model for the decode (a CUDA
    green context, see :func:`model_stream`; off by default: it measured no gain end to end).
    ``host_decode`` decodes every image on the host instead of the GPU's decoders: in
    ``host_procs`` processes (:class:`HostDecoder`), or without them on the ``decode_threads``
    host threads (:class:`GpuDecoder` ``host``): the CPU path's pixels, reproducible run to
    run (the H200's JPEG engines were not, on the bottom blocks of some images). With
    ``host_share`` (and ``host_procs``) those processes decode that share of the batches and
    the GPU's decoders the rest, side by side (``--decode both``). With ``auto_decode`` (and
    neither of those asked for) :func:`auto_host_decode` decides ``host_decode`` from the
    teachers' FLOPs and ``host_procs`` (``--decode auto``); ``decode_mode`` says what runs.
    """

    def __init__(self, teachers: Sequence[Teacher], target_space: str, topk: int, device: str = "cpu",
                 compile: bool = False, decode_threads: int = 4, overrides: dict[str, Any] | None = None,
                 precision: str = "fp16", gpu_decode_threads: int = 4, decode_procs: int = 0,
                 cuda_graphs: bool = True, hw_decode: bool = True, reserve_sms: int = 0, host_decode: bool = False,
                 host_procs: int = 0, host_share: float = 0.0, auto_decode: bool = False):
        import torch

        from silverlabel.teachers.labelspace import get_label_space, index_map

        if not teachers:
            raise UserError("at least one teacher")
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.torch = torch
        self.teachers = list(teachers)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.target = get_label_space(target_space)
        if not 1 <= topk <= len(self.target):
            raise UserError(f"--topk must be in 1..{len(self.target)}, got {topk}")
        self.topk = topk
        self.precision = precision
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision] if cuda \
            else torch.float32
        self.transforms = [EvalTransform.from_teacher(t, overrides) for t in self.teachers]
        self.maps = [self._mapping(index_map(get_label_space(t.label_space), self.target))
                     if get_label_space(t.label_space).name != self.target.name else None for t in self.teachers]
        if not cuda:
            keep_heap_memory()
        self.models = [self._prepare(t.model, compile and cuda) for t in self.teachers]
        if auto_decode and cuda and not host_decode and host_share <= 0:
            host_decode = auto_host_decode(self, host_procs)
        self.pool = ThreadPoolExecutor(max(1, decode_threads))
        self.gpu_decode_threads = max(1, min(2, gpu_decode_threads))
        self.decoders = [GpuDecoder(self.device, use_hw=hw_decode, pool=self.pool, host=host_decode)
                         for _ in range(self.gpu_decode_threads)] if cuda else []
        hw = bool(self.decoders) and self.decoders[0].use_hw
        self.decode_procs = decode_procs if cuda and not hw and not host_decode else 0
        self.cuda_graphs = cuda_graphs and cuda
        self._graphs: dict[int, Any] = {}
        # classify from several threads (reinforce overlaps shards): a CUDA graph's input and
        # output buffers are shared, so each batch's copy-in, replay and copy-out are queued
        # together
        self._classify_lock = threading.RLock()
        self._workers: list = []
        self._tasks = self._results = None
        self._worker_counts: Counter = Counter()
        self._cpu_tfms = [tf.cpu() for tf in self.transforms] if not cuda else None
        self.reserve_sms = reserve_sms
        # --decode host on a GPU: decode processes (threads in this process without them);
        # --decode both: those processes take host_share of the batches, the GPU's decoders the rest
        self.host_share = 1.0 if host_decode else min(1.0, max(0.0, host_share))
        self.host_decoder = HostDecoder(host_procs, self.device) \
            if cuda and self.host_share > 0 and host_procs > 0 else None
        self._stream = self._green = None
        self.model_sms = None

    @property
    def decode_mode(self) -> str:
        """Where this labeler decodes images now: cpu (a CPU labeler), or on a GPU gpu (its
        decoders), host (the decode processes, or host threads without them) or both
        (``host_share`` of the batches in the processes); read from what runs, so a ring that
        ``/dev/shm`` had no room for, which leaves ``both`` to the GPU's decoders, says gpu."""
        if self.device.type != "cuda":
            return "cpu"
        if self.host_decoder is None:
            return "host" if self.decoders and self.decoders[0].host else "gpu"
        return "host" if self.host_share >= 1 else "both"

    def _prepare(self, model, compile: bool):
        torch = self.torch
        m = model.to(self.device).eval()
        if self.dtype != torch.float32:
            m = m.to(self.dtype)
            for mod in m.modules():  # BatchNorm statistics in fp32 (cuDNN takes fp16 input with fp32 parameters)
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.float()
            head = m.get_classifier() if hasattr(m, "get_classifier") else None
            if isinstance(head, torch.nn.Module) and any(True for _ in head.parameters()):
                # logits in fp32: fp16's spacing near logit 10 (0.008) is wider than the gap
                # between the top two classes of a near-tie, which would flip top-1 at random
                head.float()
                head.register_forward_pre_hook(lambda _mod, args: tuple(a.float() for a in args))
        m = m.to(memory_format=torch.channels_last)
        return torch.compile(m) if compile else m

    def _mapping(self, mapping: np.ndarray) -> list[tuple[Any, Any]]:
        """The mapping as layers of (source columns, target columns), each layer one-to-one,
        so merging classes is a few deterministic index_add_ calls (no atomics racing)."""
        torch = self.torch
        src = np.nonzero(mapping >= 0)[0]
        dst = mapping[src]
        order = np.argsort(dst, kind="stable")
        src, dst = src[order], dst[order]
        first = np.r_[0, np.nonzero(np.diff(dst))[0] + 1]
        rank = np.arange(len(dst)) - np.repeat(first, np.diff(np.r_[first, len(dst)]))
        return [(torch.as_tensor(src[rank == r], device=self.device), torch.as_tensor(dst[rank == r], device=self.device))
                for r in range(int(rank.max()) + 1 if len(rank) else 0)]

    @property
    def decode_counts(self) -> dict[str, int]:
        """Images decoded by each path so far (``hw``, ``nvjpeg``, ``pillow``, ``failed``)."""
        total = Counter(self._worker_counts)
        for d in self.decoders:
            total.update(d.counts)
        if self.host_decoder is not None:
            total.update(self.host_decoder.counts)
        return {k: total.get(k, 0) for k in DECODE_PATHS}

    # -- the shared tail: logits -> probs -> target space -> top-k ---------------------
    def _probs(self, i: int, logits):
        torch = self.torch
        logits = logits.float()
        probs = logits.softmax(-1) if self.teachers[i].activation == "softmax" else logits.sigmoid()
        layers = self.maps[i]
        if layers is None:
            return probs
        out = torch.zeros(probs.shape[0], len(self.target), device=probs.device, dtype=probs.dtype)
        for src, dst in layers:
            out.index_add_(1, dst, probs.index_select(1, src))
        return out

    def _topk(self, per_teacher: list):
        probs = per_teacher[0] if len(per_teacher) == 1 else sum(per_teacher) / len(per_teacher)
        vals, idx = probs.topk(self.topk, dim=-1, largest=True, sorted=True)
        return idx.to(self.torch.int32), vals.to(self.torch.float32)

    def forward(self, xs: Sequence[Any]):
        """Prepared batches (one per teacher, in the model dtype) -> (top indices, top probs)."""
        return self._topk([self._probs(i, m(x)) for i, (m, x) in enumerate(zip(self.models, xs))])

    def _runner(self, batch: int):
        """The model tail for batches of up to ``batch`` images: a CUDA graph when it captures."""
        if not self.cuda_graphs:
            return self.forward
        if batch not in self._graphs:
            try:
                self._graphs[batch] = _Graph(self, batch)
            except Exception as e:  # a teacher that syncs or branches on data: run it eagerly
                log.warning("CUDA graph capture failed (%s: %s): running the model eagerly", type(e).__name__, e)
                self.cuda_graphs = False
                self.torch.cuda.synchronize(self.device)
                return self.forward
        return self._graphs[batch]

    def teacher_stream(self) -> Any:
        """The model's stream for :meth:`_run_gpu` (made once): on a green context that leaves
        ``reserve_sms`` SMs to the decode when asked."""
        if self._stream is None:
            self._stream, self._green, self.model_sms = model_stream(self.device, self.reserve_sms)
        return self._stream

    # -- prepared images (reinforce) -----------------------------------------------------
    def prepare_classify(self, batch: int, embeddings: bool = False) -> None:
        """Capture :meth:`classify`'s CUDA graph for batches of up to ``batch`` images now,
        before other threads queue work on the GPU (no-op on the CPU, with embeddings, or
        when captured already)."""
        with self._classify_lock:
            if self.cuda_graphs and not embeddings and not any(b >= batch for b in self._graphs):
                self._runner(batch)

    def classify(self, images: Sequence[Any], embeddings: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`classify_async`'s result, waited for."""
        return self.classify_async(images, embeddings).result()

    def classify_async(self, images: Sequence[Any], embeddings: bool = False) -> Outputs:
        """Teacher outputs for already-augmented images: ``images[i]`` is a uint8
        ``(N, S_i, S_i, 3)`` array (or tensor, on any device) at teacher ``i``'s input size (``self.transforms[i].size``),
        normalized here with the teacher's mean/std (no resize, no crop).

        Returns numpy ``(top indices [N,k] int32, top probs [N,k] float32, embeddings)``;
        ``embeddings`` (with ``embeddings=True``) is float16 ``[N, sum D_i]``: each teacher's
        pre-logits (timm ``forward_head(pre_logits=True)``), concatenated in teacher order.
        Probabilities of an ensemble are averaged in the target space, as in :meth:`run`.

        On a GPU without ``embeddings`` the model runs as :meth:`run`'s does: a CUDA graph of
        the smallest batch captured that holds the images (:meth:`prepare_classify` captures
        one ahead of other threads), smaller batches padded. Eager, the host's kernel launches
        were the bound of reinforce with efficientnet_lite0 (py-spy on the H200: 60% of the
        stage's main thread in the convolutions' launches).

        Returns at once with the outputs on their way to the host (:class:`Outputs`; its
        ``result()`` waits), so that the caller can queue the next batch while this one runs:
        reinforce's main thread had spent a third of its time waiting here. Thread-safe."""
        with self._classify_lock:
            return self._classify_async(images, embeddings)

    def _classify_async(self, images: Sequence[Any], embeddings: bool) -> Outputs:
        torch = self.torch
        per_teacher, embs = [], []
        with torch.inference_mode():
            xs = []
            for i, tf in enumerate(self.transforms):
                x = images[i] if isinstance(images[i], torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images[i]))
                x = x.to(self.device)
                xs.append(normalize_batch(x.permute(0, 3, 1, 2), tf).to(self.dtype))
            if not embeddings and self.cuda_graphs:
                n = xs[0].shape[0]
                idx, vals = self._runner(min((b for b in self._graphs if b >= n), default=n))(xs)
                return Outputs(self.device, idx, vals)
            for i, (model, x) in enumerate(zip(self.models, xs)):
                if embeddings:
                    pre = model.forward_head(model.forward_features(x), pre_logits=True)
                    logits = model.get_classifier()(pre)
                    embs.append(pre.float())
                else:
                    logits = model(x)
                per_teacher.append(self._probs(i, logits))
            idx, vals = self._topk(per_teacher)
            emb = torch.cat(embs, 1).to(torch.float16) if embeddings else None
        return Outputs(self.device, idx, vals, emb)

    # -- CPU path -----------------------------------------------------------------------
    def _prep_cpu(self, data: bytes):
        img = decode_rgb(data)
        return [tf(img) for tf in self._cpu_tfms]

    def _run_cpu(self, batches: Iterable[tuple[list[str], str, list[tuple[int, int]]]]):
        torch = self.torch
        for keys, path, locs in batches:
            blobs = read_blobs(path, locs)
            futures = [self.pool.submit(self._prep_cpu, b) for b in blobs]
            ok_keys, tensors, failed = [], [], []
            for key, fut in zip(keys, futures):
                try:
                    tensors.append(fut.result())
                    ok_keys.append(key)
                except Exception as e:
                    failed.append((key, f"{type(e).__name__}: {e}"))
            if not ok_keys:
                yield [], np.zeros((0, self.topk), np.int32), np.zeros((0, self.topk), np.float32), failed
                continue
            with torch.inference_mode():
                per_teacher = []
                for i, model in enumerate(self.models):
                    x = torch.stack([t[i] for t in tensors]).contiguous(memory_format=torch.channels_last)
                    per_teacher.append(self._probs(i, model(x)))
                idx, vals = self._topk(per_teacher)
            yield ok_keys, idx.numpy(), vals.numpy(), failed

    # -- GPU path -----------------------------------------------------------------------
    def _start_workers(self) -> None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        for _ in range(self.decode_procs):
            w = ctx.Process(target=decode_worker, daemon=True,
                            args=(str(self.device), self.transforms, self._tasks, self._results,
                                  any(d.use_hw for d in self.decoders)))
            w.start()
            self._workers.append(w)

    def close(self) -> None:
        """Stop the decode worker processes."""
        if self.host_decoder is not None:
            self.host_decoder.close()
        for _ in self._workers:
            self._tasks.put(None)
        for w in self._workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
        self._workers = []

    def _prepare_batch(self, decoder: GpuDecoder, keys: list[str], blobs: list[bytes]):
        """Decode + resize/crop/normalize one batch on the current stream."""
        refs, errors, keep = decoder.decode(blobs)
        return self._crops(keys, refs, errors, keep)

    def _crops(self, keys: list[str], refs: list[Any], errors: list[str | None], keep: list[Any]):
        """A decoded batch's resized, cropped, normalized teacher inputs, queued on the
        current stream: (keys decoded, inputs per teacher, (key, error) of the failed, keep)."""
        ok = [j for j, e in enumerate(errors) if e is None]
        failed = [(keys[j], errors[j]) for j in range(len(keys)) if errors[j] is not None]
        xs = [resize_crop_batch([refs[j] for j in ok], tf, self.device, self.dtype) for tf in self.transforms] \
            if ok else []
        return [keys[j] for j in ok], xs, failed, keep

    def _produce_with_workers(self, batches, emit) -> None:
        """Batches decoded by the worker processes (GPUs without JPEG engines)."""
        if not self._workers:
            self._start_workers()
        in_flight = 0

        def receive() -> None:
            while True:
                try:
                    bid, keys, crops, failed, counts, error = self._results.get(timeout=5)
                    break
                except queue.Empty:
                    dead = [w for w in self._workers if not w.is_alive()]
                    if dead:
                        self._workers = [w for w in self._workers if w.is_alive()]
                        raise RuntimeError(f"a GPU decode worker died (exit code {dead[0].exitcode})") from None
            if error:
                raise RuntimeError(f"decode worker failed on batch {bid}: {error}")
            self._worker_counts.update(counts)
            xs = [normalize_batch(c, tf).to(self.dtype) for c, tf in zip(crops, self.transforms)]
            del crops
            emit(keys, xs, failed, None)

        for bid, (keys, blobs_or_path, locs) in enumerate(batches):
            self._tasks.put((bid, blobs_or_path, keys, locs))
            in_flight += 1
            while in_flight >= 2 * self.decode_procs:
                receive()
                in_flight -= 1
        while in_flight:
            receive()
            in_flight -= 1

    def _run_gpu(self, batches: Iterable[tuple[list[str], str, list[tuple[int, int]]]],
                 sizes: dict[str, tuple[int, int]] | None = None):
        torch = self.torch
        it = iter(batches)
        first = next(it, None)
        if first is None:
            return
        runner = self._runner(len(first[0]))  # captured before any other thread touches the GPU
        # The model runs on a stream of its own, not the legacy default stream: that one waits
        # implicitly for every blocking stream (nvImageCodec's internal ones among them).
        current = self.teacher_stream()
        batches = itertools.chain([first], it)
        abort = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=3)
        stop = object()

        def guarded(fn):
            def body(*args):
                try:
                    fn(*args)
                except BaseException as e:  # surfaces in the consumer
                    put_unless(ready, e, abort)
                    return
                put_unless(ready, stop, abort)
            return body

        threads = []
        if self.host_decoder is not None and not self.host_decoder.start(len(first[0]),
                                                                         _largest_batch(sizes, len(first[0]))):
            self.host_decoder.close()  # no room in /dev/shm: host threads (GpuDecoder host) or the GPU's
            self.host_decoder = None  # decoders alone from now on
        if self.host_decoder is not None and self.host_share < 1:
            # --decode both: every batch to one side, by its index (the same images on the same
            # side run to run), the host's share evenly spread
            route, host_batches, batches = split_batches(batches, self.host_share, abort)
            threads.append(threading.Thread(target=guarded(route), daemon=True))
            threads.append(threading.Thread(target=guarded(self._produce_host), daemon=True,
                                            args=(host_batches, ready, abort, sizes)))
        elif self.host_decoder is not None:
            threads.append(threading.Thread(target=guarded(self._produce_host), daemon=True,
                                            args=(batches, ready, abort, sizes)))
            batches = None  # none left for the GPU's decoders
        if batches is not None and self.decode_procs:
            stream = producer_stream(self.device)

            def emit(keys, xs, failed, keep):
                ev = torch.cuda.Event()
                ev.record(stream)
                put_unless(ready, (keys, xs, failed, ev, keep), abort)

            def produce_procs():
                with torch.cuda.stream(stream):
                    self._produce_with_workers(batches, emit)

            threads.append(threading.Thread(target=guarded(produce_procs), daemon=True))
        elif batches is not None:
            read_q: queue.Queue = queue.Queue(maxsize=2 * len(self.decoders))

            def reader():  # host I/O off the decode threads
                try:
                    for keys, path, locs in batches:
                        if not put_unless(read_q, (keys, read_blobs(path, locs)), abort):
                            return
                finally:
                    for _ in self.decoders:
                        put_unless(read_q, stop, abort)

            def produce(decoder: GpuDecoder):
                stream = producer_stream(self.device)
                with torch.cuda.stream(stream):
                    while (item := _get(read_q, abort)) is not stop and item is not None:
                        keys, xs, failed, keep = self._prepare_batch(decoder, *item)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        if not put_unless(ready, (keys, xs, failed, ev, keep), abort):
                            return

            threads.append(threading.Thread(target=guarded(reader), daemon=True))
            threads += [threading.Thread(target=guarded(produce), args=(d,), daemon=True) for d in self.decoders]
        for th in threads:
            th.start()
        k = self.topk
        B = len(first[0])  # the largest batch: the reader's batches are full but for the last
        ring = [(torch.empty((B, k), dtype=torch.int32, pin_memory=True),
                 torch.empty((B, k), dtype=torch.float32, pin_memory=True)) for _ in range(3)]
        pending = None  # (keys, idx, vals, failed, done event, keepalive) of the previous batch
        finished = 0
        try:
            for step in itertools.count():
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                if item is stop:
                    finished += 1
                    if finished == len(threads):
                        break
                    continue
                keys, xs, failed, ev, keep = item
                current.wait_event(ev)
                n = len(keys)
                idx_h, val_h = ring[step % 3]
                if n:
                    for x in xs:
                        x.record_stream(current)
                    if n > B:
                        raise ValueError(f"batch of {n} after a first batch of {B}: batches must not grow")
                    with torch.cuda.stream(current), torch.inference_mode():
                        idx, vals = runner(xs)
                        idx_h[:n].copy_(idx, non_blocking=True)
                        val_h[:n].copy_(vals, non_blocking=True)
                # waited on by _collect: a blocking event sleeps the thread, not spin on a core
                # the host decode processes need
                done = torch.cuda.Event(blocking=True)
                done.record(current)
                del xs
                # hand back the previous batch while this one computes
                if pending is not None:
                    yield self._collect(pending)
                pending = (keys, idx_h, val_h, failed, done, keep)
            if pending is not None:
                yield self._collect(pending)
        finally:
            abort.set()
            for th in threads:
                th.join(timeout=10)

    def _produce_host(self, batches, ready: queue.Queue, abort: threading.Event,
                      sizes: dict[str, tuple[int, int]] | None = None) -> None:
        """Batches decoded by the host decode processes (:class:`HostDecoder`), two at a time,
        copied to the device, resized and cropped on a producer stream, handed to ``ready``."""
        torch, hd = self.torch, self.host_decoder
        stream = producer_stream(self.device)
        inflight: deque = deque()
        spilled = hd.spilled

        def finish_one() -> bool:
            keys, b = inflight.popleft()
            images, errors, keep = hd.finish(b)
            refs = [tensor_ref(t) if t is not None else None for t in images]
            item = self._crops(keys, refs, errors, keep + images)
            ev = torch.cuda.Event()
            ev.record(stream)
            return put_unless(ready, (*item[:3], ev, item[3]), abort)

        try:
            with torch.cuda.stream(stream):
                for keys, path, locs in batches:
                    if hd.want:  # a batch lacked room: a bigger ring, once the batches in it are done
                        while inflight:
                            if not finish_one():
                                return
                        hd.grow()
                    shapes = [sizes.get(k) for k in keys] if sizes else None
                    if shapes is not None and None in shapes:
                        shapes = None
                    inflight.append((keys, hd.submit(path, locs, shapes)))
                    if len(inflight) >= hd.SLOTS - 1 and not finish_one():
                        return
                while inflight:
                    if not finish_one():
                        return
        finally:
            while inflight:
                hd.drop(inflight.popleft()[1])
            if hd.spilled > spilled:  # right, but slower: say so
                log.info("host decode: %d images did not fit their place in the decode ring (a size other than "
                         "the samples table's, or no sizes) and came back through a pipe", hd.spilled - spilled)

    @staticmethod
    def _collect(pending):
        keys, idx_h, val_h, failed, done, _keep = pending
        done.synchronize()
        n = len(keys)
        return keys, idx_h[:n].numpy().copy(), val_h[:n].numpy().copy(), failed

    def run(self, batches: Iterable[tuple[list[str], str, list[tuple[int, int]]]],
            sizes: dict[str, tuple[int, int]] | None = None) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list]]:
        """Label batches ``(keys, file, [(offset, size), ...])`` of JPEG members.

        ``sizes``: each key's (height, width), in file order, where known (the samples
        table's); the host decode processes then lay a batch out exactly (:class:`HostDecoder`).
        On the GPU, batches can come back out of order: order rows by key."""
        if self.device.type == "cuda":
            yield from self._run_gpu(batches, sizes)
        else:
            yield from self._run_cpu(batches)


def keep_heap_memory() -> None:
    """Stop glibc from returning large blocks to the OS after every forward pass.

    CPU inference frees and re-allocates tens of MB of activations per batch; with glibc's
    defaults each of those is a fresh mmap that the kernel must zero and fault in again
    (measured: 2.8M page faults, ~40% of the time in the kernel, EfficientNet-Lite0 at
    60 img/s on 2 cores; with this, 115 img/s). No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, ctypes.c_int(2**31 - 1))  # M_TRIM_THRESHOLD
        libc.mallopt(-3, ctypes.c_int(2**31 - 1))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
