"""libjpeg-turbo's fast decode options for ingest's re-encoded JPEGs: time and quality.

Decodes JPEGs made from scikit-image's photos (q90, short side ~1,000-1,200 px, so a 600 px
target is a < 2x reduction, ingest's commonest resize) with simplejpeg's accurate settings
(islow IDCT, fancy upsampling: what ingest uses) and with the fast IDCT and/or fast
upsampling, resizes each to a 600 px short side as ``--resize-filter fast`` does below 2x
(OpenCV bilinear), and compares with Pillow's Lanczos of the accurate decode: the project's
rule allows a cheaper path only within 0.5 dB of that (BENCHMARKS.md, issue 14).

    python bench/decode_options.py
    python bench/decode_options.py --reductions   # cheaper 2-4x reductions than OpenCV's area
"""

from __future__ import annotations

import io
import time

import cv2
import numpy as np
import simplejpeg
import skimage.data
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_jpegs() -> list[bytes]:
    out = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()[..., :3]
        h, w = a.shape[:2]
        for factor in (1.0, 1.2):
            s = max(1000 / min(h, w), 1.0) * factor
            im = Image.fromarray(a).resize((int(w * s), int(h * s)), Image.Resampling.BICUBIC)
            b = io.BytesIO()
            im.save(b, "JPEG", quality=90)
            out.append(b.getvalue())
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def main() -> None:
    cv2.setNumThreads(1)
    jpegs = make_jpegs()
    print(f"{len(jpegs)} JPEGs; decode then bilinear to a 600 px short side, against Lanczos of the accurate decode")
    print("| decode | ms per image | PSNR vs Lanczos (dB) | worst image's drop (dB) |\n|---|---:|---:|---:|")
    base = None
    for label, fast_dct, fast_up in (("accurate (today's)", False, False), ("fast IDCT", True, False),
                                     ("fast upsampling", False, True), ("both", True, True)):
        seconds, scores = 0.0, []
        for data in jpegs:
            t0 = time.perf_counter()
            for _ in range(3):
                arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast_dct, fastupsample=fast_up)
            seconds += (time.perf_counter() - t0) / 3
            ref = simplejpeg.decode_jpeg(data, colorspace="RGB")
            h, w = ref.shape[:2]
            s = 600 / min(h, w)
            size = (round(w * s), round(h * s))
            lanczos = np.asarray(Image.fromarray(ref).resize(size, Image.Resampling.LANCZOS))
            scores.append(psnr(cv2.resize(arr, size, interpolation=cv2.INTER_LINEAR), lanczos))
        scores = np.array(scores)
        base = scores if base is None else base
        print(f"| {label} | {seconds / len(jpegs) * 1e3:.2f} | {scores.mean():.2f} | {(base - scores).max():.2f} |")


def _half_box_then(inter: int):
    """Exact 2x box reductions (an odd last row/column dropped) while >= 2x remains, then
    OpenCV's ``inter`` for the rest."""
    def resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        while min(arr.shape[1] / size[0], arr.shape[0] / size[1]) >= 2:
            h, w = arr.shape[:2]
            arr = cv2.resize(arr[:h - h % 2, :w - w % 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        return cv2.resize(arr, size, interpolation=inter)
    return resize


def _pyramid_then_bilinear(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    while min(arr.shape[1] / size[0], arr.shape[0] / size[1]) >= 2:
        arr = cv2.pyrDown(arr)
    return cv2.resize(arr, size, interpolation=cv2.INTER_LINEAR)


def reductions() -> None:
    """Cheaper 2-4x reductions than OpenCV's area (``--resize-filter fast`` above 2x, slow at
    non-integer factors): PSNR against Pillow's Lanczos of the same pixels, and the worst
    photo's drop against area, over scikit-image photos scaled to 600 px x the factor."""
    names = PHOTOS + ("camera", "brick", "grass", "gravel")
    ways = {"area (today's)": lambda a, s: cv2.resize(a, s, interpolation=cv2.INTER_AREA),
            "2x box, then bilinear": _half_box_then(cv2.INTER_LINEAR),
            "2x box, then area": _half_box_then(cv2.INTER_AREA),
            "pyrDown, then bilinear": _pyramid_then_bilinear,
            "Pillow bilinear, reducing_gap 2": lambda a, s: np.asarray(
                Image.fromarray(a).resize(s, Image.Resampling.BILINEAR, reducing_gap=2.0))}
    print("| factor | " + " | ".join(ways) + " |\n|---:|" + "---:|" * len(ways))
    for factor in (2.0, 2.5, 3.0, 3.5, 3.9):
        got = {k: ([], []) for k in ways}
        for name in names:
            a = getattr(skimage.data, name)()
            a = (np.stack([a] * 3, -1) if a.ndim == 2 else a)[..., :3]
            h, w = a.shape[:2]
            s = 600 * factor / min(h, w)
            b = io.BytesIO()
            Image.fromarray(a).resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC).save(b, "JPEG", quality=90)
            arr = simplejpeg.decode_jpeg(b.getvalue(), colorspace="RGB")
            h, w = arr.shape[:2]
            size = (round(w * 600 / min(h, w)), round(h * 600 / min(h, w)))
            ref = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))
            for k, fn in ways.items():
                t0 = time.perf_counter()
                out = fn(arr, size)
                got[k][1].append(time.perf_counter() - t0)
                got[k][0].append(psnr(out, ref))
        area = np.array(got["area (today's)"][0])
        cells = [f"{np.mean(v):.1f} dB, worst {np.min(np.array(v) - area):+.1f}, {np.mean(t) * 1e3:.1f} ms"
                 for v, t in got.values()]
        print(f"| {factor} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    import sys

    reductions() if "--reductions" in sys.argv else main()
