"""Triton kernels for the GPU replay's RandAugment ops (issue 18): one pass over uint8 pixels
per op family, where :mod:`silverlabel.replay_torch`'s torch path runs a chain of elementwise
kernels over float64 / int64 copies of the views (its affine warp alone moved ~14 GB per batch
of 1,024 views of 224 px; the replay was memory-bound on an H200).

Each kernel is the torch path's arithmetic, operation for operation, so the bytes are the
same (``tests/test_replay_torch.py`` checks them against the torch path under
``TRITON_INTERPRET=1`` on the CPU, and against the CPU replay on a GPU):

- :func:`affine`: Pillow's generic affine transform with the bilinear filter, source
  coordinates and interpolation in float64, truncated, grey 128 outside;
- :func:`lookup`: a per-view, per-channel 256-entry table (the point ops);
- :func:`blend`: ``Image.blend(degenerate, x, alpha)`` in float32 with the degenerate image
  made in the kernel: ITU-R 601 luma (Color), a per-view grey (Contrast), black
  (Brightness), the SMOOTH 3x3 filter in float32 with the border copied (Sharpness).

Every launch passes ``enable_fp_fusion=False``: Triton otherwise contracts ``a * b + c`` into
one fused multiply-add, rounded once, where Pillow (and torch's separate kernels) round
twice, and one ulp can move a truncation.

All take the batch ``x`` (uint8 [n, S, S, 3], contiguous), the rows of the views they
change (int64 [m] on the device) and per-view parameters, and return the changed views
(uint8 [m, S, S, 3]), or write them into ``out`` (shaped like ``x``) at their own rows:
:func:`silverlabel.replay_torch.apply_ops` gives each step a copy of the batch that the step's
kernels write into, instead of scattering their results back (an indexed write cost more
than the kernels)."""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK = 256  # pixels per program
# blend modes (the degenerate image)
COLOR, CONTRAST, BRIGHTNESS, SHARPNESS = range(4)
_NO_FMA = {"enable_fp_fusion": False}

if triton is not None:

    @triton.jit
    def _affine_kernel(x_ptr, rows_ptr, orows_ptr, mat_ptr, out_ptr, S, BLOCK: tl.constexpr):
        v = tl.program_id(0)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = p < S * S
        src = tl.load(rows_ptr + v).to(tl.int64)
        yy = p // S
        xx = p - yy * S
        a0 = tl.load(mat_ptr + v * 6)
        a1 = tl.load(mat_ptr + v * 6 + 1)
        a2 = tl.load(mat_ptr + v * 6 + 2)
        a3 = tl.load(mat_ptr + v * 6 + 3)
        a4 = tl.load(mat_ptr + v * 6 + 4)
        a5 = tl.load(mat_ptr + v * 6 + 5)
        xi = xx.to(tl.float64) + 0.5
        yi = yy.to(tl.float64) + 0.5
        xo = (a0 * xi + a1 * yi) + a2
        yo = (a3 * xi + a4 * yi) + a5
        sf = S.to(tl.float64)
        inside = (xo >= 0.0) & (xo < sf) & (yo >= 0.0) & (yo < sf)
        xs = xo - 0.5
        ys = yo - 0.5
        fx = tl.floor(xs)
        fy = tl.floor(ys)
        dx = xs - fx
        dy = ys - fy
        fxi = tl.minimum(tl.maximum(fx, -2.0), sf + 1.0).to(tl.int32)  # outside points are masked
        fyi = tl.minimum(tl.maximum(fy, -2.0), sf + 1.0).to(tl.int32)
        x0 = tl.minimum(tl.maximum(fxi, 0), S - 1)
        x1 = tl.minimum(tl.maximum(fxi + 1, 0), S - 1)
        y0 = tl.minimum(tl.maximum(fyi, 0), S - 1)
        y1 = tl.minimum(tl.maximum(fyi + 1, 0), S - 1)
        base = x_ptr + src * S * S * 3
        obase = out_ptr + tl.load(orows_ptr + v).to(tl.int64) * S * S * 3 + p * 3
        for c in tl.static_range(3):
            p00 = tl.load(base + (y0 * S + x0) * 3 + c, mask=live, other=0).to(tl.float64)
            p01 = tl.load(base + (y0 * S + x1) * 3 + c, mask=live, other=0).to(tl.float64)
            p10 = tl.load(base + (y1 * S + x0) * 3 + c, mask=live, other=0).to(tl.float64)
            p11 = tl.load(base + (y1 * S + x1) * 3 + c, mask=live, other=0).to(tl.float64)
            v1 = p00 + (p01 - p00) * dx
            v2 = p10 + (p11 - p10) * dx
            val = v1 + (v2 - v1) * dy
            out = tl.minimum(tl.maximum(val.to(tl.int32), 0), 255)  # C's truncation, then clip
            out = tl.where(inside, out, 128)
            tl.store(obase + c, out.to(tl.uint8), mask=live)

    @triton.jit
    def _lookup_kernel(x_ptr, rows_ptr, orows_ptr, lut_ptr, out_ptr, N3, BLOCK: tl.constexpr):
        v = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = i < N3
        src = tl.load(rows_ptr + v).to(tl.int64)
        val = tl.load(x_ptr + src * N3 + i, mask=live, other=0).to(tl.int32)
        out = tl.load(lut_ptr + (v * 3 + i % 3) * 256 + val, mask=live, other=0)
        tl.store(out_ptr + tl.load(orows_ptr + v).to(tl.int64) * N3 + i, out, mask=live)

    @triton.jit
    def _row3(base, y, xx, S, c, k1, mid, live):
        """``(r[x-1] * k1 + r[x] * mid) + r[x+1] * k1`` of row ``y``, channel ``c``, float32."""
        a = tl.load(base + (y * S + xx - 1) * 3 + c, mask=live, other=0).to(tl.float32)
        b = tl.load(base + (y * S + xx) * 3 + c, mask=live, other=0).to(tl.float32)
        d = tl.load(base + (y * S + xx + 1) * 3 + c, mask=live, other=0).to(tl.float32)
        return (a * k1 + b * mid) + d * k1

    @triton.jit
    def _blend_kernel(x_ptr, rows_ptr, orows_ptr, mode_ptr, grey_ptr, alpha_ptr, out_ptr, S, k1, k5,
                      BLOCK: tl.constexpr):
        v = tl.program_id(0)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = p < S * S
        src = tl.load(rows_ptr + v).to(tl.int64)
        mode = tl.load(mode_ptr + v)
        alpha = tl.load(alpha_ptr + v)
        base = x_ptr + src * S * S * 3
        obase = out_ptr + tl.load(orows_ptr + v).to(tl.int64) * S * S * 3 + p * 3
        r = tl.load(base + p * 3, mask=live, other=0).to(tl.int32)
        g = tl.load(base + p * 3 + 1, mask=live, other=0).to(tl.int32)
        b = tl.load(base + p * 3 + 2, mask=live, other=0).to(tl.int32)
        yy = p // S
        xx = p - yy * S
        inner = live & (yy >= 1) & (yy <= S - 2) & (xx >= 1) & (xx <= S - 2)
        luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
        grey = tl.load(grey_ptr + v)
        for c in tl.static_range(3):
            if c == 0:
                xc = r
            elif c == 1:
                xc = g
            else:
                xc = b
            if mode == 0:  # Color: the luma image
                d = luma
            elif mode == 1:  # Contrast: the luma histogram's mean, one grey per view
                d = luma * 0 + grey
            elif mode == 2:  # Brightness: black
                d = luma * 0
            else:  # Sharpness: SMOOTH, rows y+1, y, y-1 in that order; the border copied
                ss = tl.full([BLOCK], 0.5, tl.float32)
                ss = ss + _row3(base, yy + 1, xx, S, c, k1, k1, inner)
                ss = ss + _row3(base, yy, xx, S, c, k1, k5, inner)
                ss = ss + _row3(base, yy - 1, xx, S, c, k1, k1, inner)
                sm = tl.minimum(tl.maximum(ss, 0.0), 255.0).to(tl.int32)
                d = tl.where(inner, sm, xc)
            diff = (xc - d).to(tl.float32)
            temp = d.to(tl.float32) + alpha * diff
            out = tl.minimum(tl.maximum(temp.to(tl.int32), 0), 255)
            tl.store(obase + c, out.to(tl.uint8), mask=live)


    @triton.jit
    def _bicubic(x):
        """Pillow's ``bicubic_filter`` (a = -0.5), as ``replay_torch._bicubic``."""
        x = tl.abs(x)
        near = ((1.5 * x - 2.5) * x) * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))

    @triton.jit
    def _box_coeffs_kernel(fmeta, imeta, lo_out, k_out, T, S, BS: tl.constexpr):
        """``replay_torch.resample_coeffs`` for view ``v`` along axis ``d`` (0: rows, 1:
        columns): ``fmeta[v, d]`` = (box start, scale, support, 1 / filter scale) float64,
        ``imeta[v, d]`` = source length. Writes the first source index ``lo[v, d, o]`` and the
        fixed-point taps ``k[v, d, t, o]`` (int32)."""
        v = tl.program_id(0)
        d = tl.program_id(1)
        row = (v * 2 + d).to(tl.int64)
        o = tl.arange(0, BS)
        live = o < S
        in0 = tl.load(fmeta + row * 4)
        scale = tl.load(fmeta + row * 4 + 1)
        support = tl.load(fmeta + row * 4 + 2)
        inv = tl.load(fmeta + row * 4 + 3)
        size = tl.load(imeta + row)
        center = in0 + (o.to(tl.float64) + 0.5) * scale
        lo = tl.maximum((center - support + 0.5).to(tl.int64), 0)  # C's (int): toward zero
        hi = tl.minimum((center + support + 0.5).to(tl.int64), size)
        n = hi - lo
        ww = tl.zeros((BS,), tl.float64)
        for t in range(0, T):  # summed tap by tap, as the C loop does
            w = _bicubic((((lo + t).to(tl.float64) - center) + 0.5) * inv)
            ww = ww + tl.where(t < n, w, 0.0)
        tl.store(lo_out + row * S + o, lo.to(tl.int32), mask=live)
        for t in range(0, T):
            w = _bicubic((((lo + t).to(tl.float64) - center) + 0.5) * inv)
            w = tl.where(t < n, w, 0.0)
            k = tl.where(ww != 0.0, w / tl.where(ww == 0.0, 1.0, ww), w)
            kf = k * 4194304.0  # 1 << 22
            fixed = tl.where(k < 0.0, kf - 0.5, kf + 0.5).to(tl.int32)  # trunc, toward zero
            tl.store(k_out + (row * T + t) * S + o, fixed, mask=live)


def box_coeffs(fmeta: torch.Tensor, imeta: torch.Tensor, taps: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both axes' resampling taps for every view in one launch: ``fmeta`` float64 [V, 2, 4]
    (box start, scale, support, 1 / filter scale; axis 0 rows, 1 columns), ``imeta`` int64
    [V, 2] (source length) on the device. Returns (first source index int32 [V, 2, size],
    fixed-point taps int32 [V, 2, taps, size]): the label stage's resize kernels' layout."""
    V = fmeta.shape[0]
    lo = torch.empty((V, 2, size), dtype=torch.int32, device=fmeta.device)
    k = torch.empty((V, 2, taps, size), dtype=torch.int32, device=fmeta.device)
    if V:
        _box_coeffs_kernel[(V, 2)](fmeta, imeta, lo, k, taps, size, BS=triton.next_power_of_2(size), **_NO_FMA)
    return lo, k


def _grid(m: int, n: int) -> tuple[int, int]:
    return (m, triton.cdiv(n, BLOCK))


def _target(x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a kernel writes view ``v``: row ``v`` of a new [m, S, S, 3] tensor, or with ``out``
    (a tensor shaped like ``x``) its row ``rows[v]``, in place."""
    if out is not None:
        return out, rows
    m, S = len(rows), x.shape[1]
    return torch.empty((m, S, S, 3), dtype=torch.uint8, device=x.device), torch.arange(m, device=x.device)


def affine(x: torch.Tensor, rows: torch.Tensor, mats: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Views ``x[rows]`` warped by ``mats`` (float64 [m, 6], output to input, on the device)."""
    dst, orows = _target(x, rows, out)
    if len(rows):
        _affine_kernel[_grid(len(rows), x.shape[1] ** 2)](x, rows, orows, mats, dst, x.shape[1], BLOCK=BLOCK, **_NO_FMA)
    return dst


def lookup(x: torch.Tensor, rows: torch.Tensor, lut: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Views ``x[rows]`` through per-view, per-channel tables ``lut`` (uint8 [m, 3, 256])."""
    dst, orows = _target(x, rows, out)
    n3 = x.shape[1] ** 2 * 3
    if len(rows):
        _lookup_kernel[_grid(len(rows), n3)](x, rows, orows, lut.contiguous(), dst, n3, BLOCK=BLOCK, **_NO_FMA)
    return dst


def blend(x: torch.Tensor, rows: torch.Tensor, modes: torch.Tensor, greys: torch.Tensor, alpha: torch.Tensor,
          k1: float, k5: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Views ``x[rows]`` blended with their degenerate images: ``modes`` int32 [m] (COLOR,
    CONTRAST, BRIGHTNESS, SHARPNESS), ``greys`` int32 [m] (Contrast's grey), ``alpha`` float32
    [m]; ``k1``, ``k5`` the SMOOTH taps 1/13 and 5/13 as float32 computes them."""
    dst, orows = _target(x, rows, out)
    S = x.shape[1]
    if len(rows):
        _blend_kernel[_grid(len(rows), S * S)](x, rows, orows, modes, greys, alpha, dst, S, k1, k5, BLOCK=BLOCK,
                                               **_NO_FMA)
    return dst
