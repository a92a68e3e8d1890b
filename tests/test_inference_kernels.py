"""The GPU path's pieces that run without a GPU: the batched resize kernels (under Triton's
interpreter, in a subprocess so that the interpreter flag is set before Triton loads), the
resize plan and the label-space mapping layers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from silverlabel.inference import EvalTransform, resize_plan

TF = EvalTransform(32, 0.875, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (height, width): wide, tall, square, upscaled, exactly the resized size, odd sizes
SIZES = [(40, 60), (36, 80), (73, 50), (36, 36), (20, 30), (45, 36), (61, 37)]


def _images():
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:  # smooth photo-like content plus noise (pure noise exaggerates rounding)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7 - c) for c in range(3)], -1)
        out.append(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    return out


def _kernel_check() -> None:
    """Run under TRITON_INTERPRET=1: the kernels against Pillow + torchvision on the CPU."""
    import torch

    from silverlabel.inference import resize_crop_batch, tensor_ref

    imgs = _images()
    tensors = [torch.from_numpy(a) for a in imgs]
    tensors[2] = torch.from_numpy(np.ascontiguousarray(imgs[2].transpose(2, 0, 1)))  # (3, H, W) as nvJPEG gives
    refs = [tensor_ref(t) for t in tensors]
    gray = np.ascontiguousarray(imgs[3][:, :, 1])
    imgs[3] = np.repeat(gray[:, :, None], 3, 2)
    g = torch.from_numpy(gray)
    refs[3] = (g.data_ptr(), gray.shape[0], gray.shape[1], gray.shape[1], 1, 0)  # one plane read as RGB
    pixels = resize_crop_batch(refs, TF, "cpu")
    normed = resize_crop_batch(refs, TF, "cpu", torch.float32)
    assert pixels.shape == (len(SIZES), 3, 32, 32) and pixels.is_contiguous(memory_format=torch.channels_last)
    cpu = TF.cpu()
    for i, a in enumerate(imgs):
        pil = cpu.transforms[1](cpu.transforms[0](Image.fromarray(a)))
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).int()
        diff = (pixels[i].int() - ref).abs()
        # Pillow <= 12 resizes width first, as the kernels do (bit-exact); Pillow 13 sometimes
        # goes height first for tall images: a few levels on a few pixels
        assert diff.max() <= 3 and diff.float().mean() < 0.1, (SIZES[i], int(diff.max()), float(diff.float().mean()))
        if SIZES[i][1] >= SIZES[i][0]:
            assert diff.max() == 0, SIZES[i]
        full = cpu(Image.fromarray(a))
        assert (normed[i] - full).abs().max() <= 3 / 255 / 0.224 + 1e-6
    print("kernels ok")


@pytest.mark.timeout(600)
def test_resize_kernels_match_pillow_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=560)
    assert p.returncode == 0 and "kernels ok" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


def test_resize_plan_matches_torchvision_geometry():
    import torch
    from torchvision.transforms import CenterCrop, Resize
    from torchvision.transforms.functional import InterpolationMode

    tf = EvalTransform(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(1)
    hs, ws = rng.integers(200, 1300, 40), rng.integers(200, 1300, 40)
    plan = resize_plan(hs, ws, tf)
    for i, (h, w) in enumerate(zip(hs, ws)):
        x = torch.arange(int(h) * int(w), dtype=torch.float64).view(1, int(h), int(w))
        r = Resize(tf.scale_size, interpolation=InterpolationMode.NEAREST)(x)
        assert r.shape[1:] == (plan["new_h"][i], plan["new_w"][i])
        c = CenterCrop(224)(torch.arange(r.shape[1] * r.shape[2]).view(1, r.shape[1], r.shape[2]))
        assert int(c[0, 0, 0]) == plan["top"][i] * r.shape[2] + plan["left"][i]
    assert (plan["rows"] > 0).all() and (plan["ylo"] >= 0).all() and (plan["ylo"] + plan["rows"] <= hs).all()


def test_mapping_layers_equal_scatter_add():
    """The label-space mapping as one-to-one layers sums merged classes like map_probs."""
    import torch

    from silverlabel.inference import Labeler
    from silverlabel.teachers.labelspace import get_label_space, index_map, map_probs

    lab = Labeler.__new__(Labeler)
    lab.torch, lab.device = torch, torch.device("cpu")
    lab.target = get_label_space("in1k")
    lab.teachers = [type("T", (), {"activation": "softmax"})()]
    m = index_map("in21k", "in1k")
    lab.maps = [lab._mapping(m)]
    assert len(lab.maps[0]) > 1  # in21k -> in1k merges classes
    logits = torch.randn(4, 21841, dtype=torch.float64)
    got = lab._probs(0, logits)
    want = map_probs(logits.float().softmax(-1), m, 1000)
    assert torch.allclose(got, torch.as_tensor(want, dtype=got.dtype), atol=1e-6)
    assert torch.equal(lab._probs(0, logits), got)  # deterministic


if __name__ == "__main__":
    _kernel_check()
