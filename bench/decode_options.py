"""libjpeg-turbo's fast decode options for ingest's re-encoded JPEGs: time and quality.

Decodes JPEGs made from scikit-image's photos (q90, short side ~1,000-1,200 px, so a 600 px
target is a < 2x reduction, ingest's commonest resize) with simplejpeg's accurate settings
(islow IDCT, fancy upsampling: what ingest uses) and with the fast IDCT and/or fast
upsampling, resizes each to a 600 px short side as ``--resize-filter fast`` does below 2x
(OpenCV bilinear), and compares with Pillow's Lanczos of the accurate decode: the project's
rule allows a cheaper path only within 0.5 dB of that (BENCHMARKS.md, issue 14).

    python bench/decode_options.py
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


if __name__ == "__main__":
    main()
