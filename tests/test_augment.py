"""Stored augmentations: the .rnf byte layout, per-key sampling, exact and resolution-robust replay."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from silverlabel.augment import (MIX_CUTMIX, MIX_MIXUP, OPS, Q, Aug, AugPolicy, Mix, apply_mix, bytes_per_aug,
                                 crop_box, decode, pack, replay, rnf_size, sample_augs, unpack)


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())  # 451 x 300


def _topk(k: int, topk: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.stack([rng.permutation(1000)[:topk] for _ in range(k)]).astype(np.int32)
    probs = np.sort(rng.dirichlet(np.ones(topk) * 0.3, size=k), axis=1)[:, ::-1].astype(np.float16)
    return labels, probs


def test_schema_sizes_and_roundtrip():
    # ImageNet+'s budget: top-10 as int32 + fp16 is 60 bytes; + crop 8, flip 1, two RandAugment ops 4 = 73
    assert bytes_per_aug(10, 2) == 73
    assert rnf_size(10, 10, 2) == 8 + 730
    assert bytes_per_aug(10, 2, emb_dim=768, mix=True) == 73 + 1536 + 14
    augs = sample_augs(AugPolicy(), 0, "000123", 640, 480, 10)
    labels, probs = _topk(10, 10)
    data = pack(augs, labels, probs)
    assert len(data) == 738
    r = unpack(data)
    assert r.augs == augs and r.k == 10 and r.topk == 10 and r.embeddings is None and r.nbytes == 738
    assert np.array_equal(r.labels, labels) and np.array_equal(r.probs, probs)
    one = unpack(data, only=7)
    assert one.augs == [augs[7]] and np.array_equal(one.labels[0], labels[7]) and np.array_equal(one.probs[0], probs[7])
    # mix partners and embeddings
    policy = AugPolicy(mix="both", ra_ops=3)
    augs = sample_augs(policy, 5, "k", 300, 200, 4, shard_len=8, position=2)
    assert all(a.mix is not None and a.mix.partner != 2 and 0 <= a.mix.partner < 8 for a in augs)
    assert {a.mix.mode for a in sample_augs(policy, 5, "k2", 300, 200, 40, 8, 0)} == {MIX_MIXUP, MIX_CUTMIX}
    emb = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float16)
    labels, probs = _topk(4, 5)
    data = pack(augs, labels, probs, emb)
    assert len(data) == rnf_size(4, 5, 3, 32, mix=True)
    r = unpack(data)
    assert r.augs == augs and np.array_equal(r.embeddings, emb)
    # damaged members fail loudly
    with pytest.raises(ValueError, match="bytes"):
        unpack(data[:-1])
    with pytest.raises(ValueError, match="version"):
        unpack(b"\x09" + data[1:])


def test_sampling_is_per_key_and_within_policy():
    policy = AugPolicy(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    a = sample_augs(policy, 0, "abc", 640, 480, 50)
    assert a == sample_augs(policy, 0, "abc", 640, 480, 50)  # a pure function of (seed, key)
    assert a != sample_augs(policy, 0, "abd", 640, 480, 50) and a != sample_augs(policy, 1, "abc", 640, 480, 50)
    flips = sum(x.flip for x in a)
    assert 10 < flips < 40
    for x in a:
        x0, y0, w, h = x.crop_fractions()
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 1 + 1e-9 and y0 + h <= 1 + 1e-9
        area = w * h
        aspect = (w * 640) / (h * 480)
        assert 0.08 - 1e-3 <= area <= 1 + 1e-9
        assert 3 / 4 - 1e-3 <= aspect <= 4 / 3 + 1e-3
        assert len(x.ops) == 2 and all(1 <= op < len(OPS) for op, _s, _l in x.ops)


def test_replay_is_deterministic_and_every_op_acts(photo):
    data = _jpeg(photo)
    aug = Aug(crop=(int(0.1 * Q), int(0.2 * Q), int(0.5 * Q), int(0.6 * Q)), flip=True, ops=((4, -1, 200), (9, 1, 230)))
    a = replay(data, aug, 96)
    b = replay(decode(data), aug, 96)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    base = replay(data, Aug(aug.crop, False), 96)
    assert np.array_equal(replay(data, Aug(aug.crop, True), 96), base[:, ::-1])  # flip is a mirror
    for op in range(1, len(OPS)):
        x = replay(data, Aug(aug.crop, False, ((op, -1, 255),)), 96)
        assert np.array_equal(x, replay(data, Aug(aug.crop, False, ((op, -1, 255),)), 96)), OPS[op][0]
        assert not np.array_equal(x, base), f"{OPS[op][0]} left the image unchanged"


def test_mix_rules():
    a = np.full((10, 10, 3), 200, np.uint8)
    b = np.zeros((10, 10, 3), np.uint8)
    cut = apply_mix(a, b, Mix(MIX_CUTMIX, 1, 0, (int(0.2 * Q), 0, int(0.3 * Q), Q)))
    assert (cut[:, 2:5] == 0).all() and (cut[:, :2] == 200).all() and (cut[:, 5:] == 200).all()
    up = apply_mix(a, b, Mix(MIX_MIXUP, 1, 0, (Q // 4, 0, 0, 0)))
    assert (up == 50).all()
    with pytest.raises(ValueError, match="partner"):
        replay(_jpeg(Image.fromarray(a)), Aug((0, 0, Q, Q), False, (), Mix(MIX_MIXUP, 1, 0, (Q // 2, 0, 0, 0))), 8)


def test_replay_survives_reencoding_at_another_resolution(photo):
    """The crop is stored as fractions of the source: a copy at another resolution (here
    re-encoded 0.6x and 1.5x) replays the same region, up to resampling and JPEG noise. A box
    kept in absolute pixels (DataCompDR's paug) lands elsewhere on the resized copy."""
    orig = _jpeg(photo)
    w, h = photo.size
    copies = [_jpeg(photo.resize((int(w * f), int(h * f)), Image.Resampling.LANCZOS)) for f in (0.6, 1.5)]
    augs = sample_augs(AugPolicy(scale=(0.25, 1.0), ra_ops=0), 3, "chelsea", w, h, 12)
    for copy in copies:
        cw, ch = Image.open(io.BytesIO(copy)).size
        fractional, absolute, unrelated = [], [], []
        for i, aug in enumerate(augs):
            ref = replay(orig, aug, 64).astype(np.int16)
            fractional.append(np.abs(replay(copy, aug, 64).astype(np.int16) - ref).mean())
            # the same box in the original's absolute pixels, applied to the copy
            box = crop_box(aug, w, h)
            x0, y0, x1, y1 = (min(v, lim) for v, lim in zip(box, (cw, ch, cw, ch)))
            if x1 - x0 > 4 and y1 - y0 > 4:
                img = decode(copy).resize((64, 64), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1))
                if aug.flip:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                absolute.append(np.abs(np.asarray(img).astype(np.int16) - ref).mean())
            unrelated.append(np.abs(replay(orig, augs[(i + 1) % len(augs)], 64).astype(np.int16) - ref).mean())
        assert max(fractional) < 3.0, fractional  # within a few grey levels of what the teacher saw
        assert np.mean(absolute) > 10 * np.mean(fractional), (absolute, fractional)
        assert np.mean(unrelated) > 5 * np.mean(fractional)
    # same bytes, same resolution: bit for bit
    assert all(np.array_equal(replay(orig, a, 64), replay(orig, a, 64)) for a in augs)


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "camera"])
def test_decode_rgb_array_is_rule_one_byte_for_byte(name):
    """The libjpeg-turbo path (simplejpeg) gives Pillow's bytes: 4:2:0 / 4:2:2 / 4:4:4,
    sizes that end mid-MCU, grayscale, progressive; CMYK, PNG and WebP go through Pillow."""
    from silverlabel.augment import decode, decode_rgb_array

    photo = Image.fromarray(getattr(skimage.data, name)())
    blobs = []
    for size in (None, (301, 227), (213, 320)):
        img = photo if size is None else photo.resize(size)
        for mode in ("RGB", "L"):
            for sub in (0, 1, 2):
                blobs.append(_encoded(img.convert(mode), quality=87, subsampling=sub))
        blobs.append(_encoded(img.convert("RGB"), quality=80, progressive=True))
    blobs += [_encoded(photo.convert("CMYK")), _encoded(photo, "PNG"), _encoded(photo, "WEBP")]
    for data in blobs:
        want = np.asarray(decode(data))
        got = decode_rgb_array(data)
        assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want)
        held = []
        into = decode_rgb_array(data, lambda shape: held.append(np.zeros(shape, np.uint8)) or held[-1])
        assert into is held[0] or np.shares_memory(into, held[0])  # written where alloc said
        assert np.array_equal(held[0], want)


def test_decode_rgb_array_rejects_what_pillow_rejects(photo):
    from silverlabel.augment import decode_rgb_array

    data = _encoded(photo.convert("RGB"), quality=90)
    with pytest.raises(OSError):
        decode_rgb_array(data[: len(data) // 2])  # truncated: Pillow's error, not half an image
    with pytest.raises(OSError):
        decode_rgb_array(b"not an image")


def test_uniform_is_numpys_uniform_draw_for_draw():
    from silverlabel.augment import _uniform

    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for lo, hi in [(0.08, 1.0), (np.log(3 / 4), np.log(4 / 3)), (0, 0.37), (0, 1e-9), (0, 1)] * 2000:
        assert _uniform(a, lo, hi) == b.uniform(lo, hi)
