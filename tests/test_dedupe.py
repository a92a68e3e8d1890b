"""Near-duplicate search over 64-bit pHashes against brute force, and on real photo copies."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
from PIL import Image

from silverlabel import dedupe as dd
from silverlabel.dedupe import (
    DEFAULT_MAX_DISTANCE,
    cluster_near_duplicates,
    dedupe_keep_first,
    exact_duplicates,
    hamming,
    hex_to_u64,
    hex_to_u64_masked,
    near_any,
    near_pairs,
    u64_to_hex,
)
from silverlabel.imageops import ImageConfig, phash, process_image


def _random(n: int, rng) -> np.ndarray:
    return rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)


def _flip(h: np.ndarray, nbits: np.ndarray, rng) -> np.ndarray:
    """Each h[i] with nbits[i] distinct random bits flipped."""
    cols = np.argsort(rng.random((len(h), 64)), axis=1)
    mask = np.zeros(len(h), np.uint64)
    for k in range(int(nbits.max(initial=0))):
        on = nbits > k
        mask[on] |= np.uint64(1) << cols[on, k].astype(np.uint64)
    return h ^ mask


def _planted(n: int, d: int, rng) -> np.ndarray:
    """n random hashes, n/3 copies of them 0..d+2 bits away, a few exact copies."""
    base = _random(n, rng)
    src = rng.integers(0, n, n // 3)
    near = _flip(base[src], rng.integers(0, d + 3, len(src)), rng)
    return rng.permutation(np.concatenate([base, near, base[:7]]))


def _brute_pairs(h: np.ndarray, d: int) -> set[tuple[int, int]]:
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(dist <= d, 1))
    return set(zip(i.tolist(), j.tolist()))


def _brute_components(h: np.ndarray, d: int) -> np.ndarray:
    """Union-find over brute-force pairs, labels by first appearance."""
    parent = list(range(len(h)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in _brute_pairs(h, d):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(len(h))]
    first: dict[int, int] = {}
    return np.array([first.setdefault(r, len(first)) for r in roots])


# ------------------------------------------------------------------ parsing and basics

def test_hex_parsing_round_trips_every_input_kind():
    rng = np.random.default_rng(0)
    vals = _random(1000, rng)
    vals[:3] = [0, 2**64 - 1, 2**63]
    hexes = [f"{int(v):016x}" for v in vals]
    assert hexes[:3] == ["0000000000000000", "ffffffffffffffff", "8000000000000000"]
    for src in (hexes, [h.upper() for h in hexes], np.array(hexes), np.array(hexes, dtype=object),
                np.array([h.encode() for h in hexes]), pa.array(hexes), pa.array(hexes, pa.large_string()),
                pa.chunked_array([hexes[:10], hexes[10:]]), pa.array(hexes).dictionary_encode()):
        np.testing.assert_array_equal(hex_to_u64(src), vals)
    np.testing.assert_array_equal(hex_to_u64(pa.array(["x" * 16] + hexes)[1:]), vals)  # sliced: offset
    assert u64_to_hex(vals) == hexes
    assert hex_to_u64([]).dtype == np.uint64 and len(hex_to_u64(pa.array([], pa.string()))) == 0


@pytest.mark.parametrize("bad", [None, "123", "0123456789abcdeg", " 123456789abcdef", "0123456789abcdef0"])
def test_hex_parsing_names_the_first_bad_value(bad):
    good = ["0123456789abcdef"] * 3
    with pytest.raises(ValueError, match=rf"row 2: {bad!r}"):
        hex_to_u64(good[:2] + [bad] + good)
    with pytest.raises(ValueError, match="row 2"):
        hex_to_u64(pa.array(good[:2] + [bad] + good, pa.string()))
    vals, ok = hex_to_u64_masked(pa.array(good[:2] + [bad] + good, pa.string()))
    assert ok.tolist() == [True, True, False, True, True, True] and vals[2] == 0
    assert vals[0] == 0x0123456789ABCDEF


def test_hamming_and_input_validation():
    a = np.array([0, 0xFF, 2**64 - 1], np.uint64)
    assert hamming(a, np.uint64(0)).tolist() == [0, 8, 64]
    assert hamming(a.view(np.int64), a.view(np.int64)).tolist() == [0, 0, 0]
    for d in (-1, 65, 2.0, True, "8", None):
        with pytest.raises(ValueError, match="max_distance"):
            near_pairs(a, d)
    with pytest.raises(ValueError, match="1-D"):
        near_pairs(np.zeros((2, 2), np.uint64), 2)
    with pytest.raises(ValueError, match="dtype"):
        near_pairs(np.zeros(3, np.float64), 2)
    with pytest.raises(ValueError, match="order"):
        dedupe_keep_first(a, 2, order=[1, 2])
    for w in (0, -1, 1.5):
        with pytest.raises(ValueError, match="workers"):
            dedupe_keep_first(a, 2, workers=w)
    # hex strings and signed int64 are accepted as hashes
    assert near_pairs(["00000000000000ff", "00000000000000fe"], 1)[0].tolist() == [0]
    assert cluster_near_duplicates(a.view(np.int64), 8).tolist() == [0, 0, 1]
    for f in (lambda h: near_pairs(h, 3), lambda h: dedupe_keep_first(h, 3), lambda h: near_any(h, h, 3)):
        for r in f(np.zeros(0, np.uint64)):
            assert len(r) == 0


# ------------------------------------------------------------------ exactness against brute force

@pytest.mark.parametrize("d", [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16])
def test_near_pairs_equal_brute_force(d):
    rng = np.random.default_rng(d)
    h = _planted(900, d, rng)
    i, j = near_pairs(h, d)
    got = list(zip(i.tolist(), j.tolist()))
    assert got == sorted(_brute_pairs(h, d))  # each pair once, sorted, none missed, none extra
    i1, j1 = near_pairs(h, d, workers=1)
    assert (i1.tolist(), j1.tolist()) == (i.tolist(), j.tolist())
    labels = cluster_near_duplicates(h, d)
    np.testing.assert_array_equal(labels, _brute_components(h, d))


@pytest.mark.parametrize("d", [2, 5, 8, 11, 16])
def test_every_multi_index_plan_is_exact(d):
    """Whatever plan the cost model picks: every chunk count m gives the brute-force pairs,
    single- and multi-threaded (the model alone would pick all-pairs for so few hashes)."""
    rng = np.random.default_rng(100 + d)
    u = np.unique(_planted(600, d, rng))
    want = _brute_pairs(u, d)
    for m in range(1, d + 2):
        plan = dd._chunks(m, d)
        if max(dd._vol(len(c.bits), c.radius) for c in plan) > 20_000:
            continue  # m = 1, 2 at large d: enumerating flip patterns takes too long for a test
        for workers in (1, 2):
            i, j = dd._self_pairs(u, d, plan, workers=workers)
            got = list(zip(i.tolist(), j.tolist()))
            assert len(got) == len(set(got)) and set(got) == want, (m, workers)


def test_long_runs_of_equal_chunk_values():
    """Thousands of distinct hashes agreeing on one chunk (runs > 255: the long-run path)."""
    rng = np.random.default_rng(7)
    plan = dd._chunks(3, 6)
    base = _random(1, rng)[0]
    free = np.uint64(sum(1 << b for b in range(64) if b % 3))  # bits outside chunk 0
    h = np.unique(base ^ (_random(3000, rng) & free & np.uint64(0xFFFF)))  # 11 free bits: dense
    h = np.concatenate([h, _random(500, rng)])
    got = set(zip(*(x.tolist() for x in dd._self_pairs(h, 6, plan))))
    assert got == _brute_pairs(h, 6)


def test_near_any_equals_brute_force():
    rng = np.random.default_rng(3)
    for d, n_pool, n_ref in [(0, 500, 300), (4, 2000, 50), (8, 300, 3000), (8, 2000, 2000), (12, 800, 400)]:
        pool = _planted(n_pool, d, rng)
        ref = np.concatenate([_flip(pool[rng.integers(0, len(pool), n_ref // 3)],
                                    rng.integers(0, d + 3, n_ref // 3), rng), _random(n_ref, rng)])
        ref = np.concatenate([ref, ref[:5]])  # repeated reference hashes
        mask, idx = near_any(pool, ref, d)
        dist = np.bitwise_count(pool[:, None] ^ ref[None, :]).astype(np.int64)
        want_mask = (dist <= d).any(axis=1)
        score = np.where(dist <= d, dist * len(ref) + np.arange(len(ref)), np.iinfo(np.int64).max)
        want_idx = np.where(want_mask, score.argmin(axis=1), -1)  # nearest, then smallest index
        np.testing.assert_array_equal(mask, want_mask)
        np.testing.assert_array_equal(idx, want_idx)
        assert 0 < want_mask.sum() < len(pool)
        for plan_side in (pool, ref):  # the multi-index path on both sides, explicit plan
            other = ref if plan_side is pool else pool
            q, t = np.unique(plan_side), np.unique(other)
            i, j, dd_ = dd._cross_pairs_plan(q, t, d, dd._chunks(3, d), workers=2)
            got = set(zip(i.tolist(), j.tolist()))
            bd = np.bitwise_count(q[:, None] ^ t[None, :])
            assert got == set(zip(*(x.tolist() for x in np.nonzero(bd <= d))))
            np.testing.assert_array_equal(dd_, bd[i, j])


# ------------------------------------------------------------------ clustering and keep-first

def test_clusters_are_transitive_and_keep_first_is_deterministic():
    a = np.uint64(0)
    b = a ^ np.uint64(0b1111)  # 4 bits from a
    c = b ^ np.uint64(0b1111_0000)  # 4 bits from b, 8 from a
    far = np.uint64(0xFFFF_0000_0000_0000)
    h = np.array([c, far, a, b, far ^ np.uint64(1)], np.uint64)
    assert hamming(h[0:1], h[2:3])[0] == 8
    assert cluster_near_duplicates(h, 4).tolist() == [0, 1, 0, 0, 1]
    assert cluster_near_duplicates(h, 3).tolist() == [0, 1, 2, 3, 1]
    keep, dup = dedupe_keep_first(h, 4)  # default: smallest position
    assert keep.tolist() == [True, True, False, False, False] and dup.tolist() == [-1, -1, 0, 0, 1]
    keys = ["k3", "k9", "k1", "k2", "k0"]
    for order in (keys, np.array(keys), pa.array(keys), pa.chunked_array([keys[:2], keys[2:]])):
        keep, dup = dedupe_keep_first(h, 4, order=order)  # smallest key wins, as `select` wants
        assert keep.tolist() == [False, False, True, False, True]
        assert dup.tolist() == [2, 4, -1, 2, -1]
    keep, dup = dedupe_keep_first(h, 4, order=[5, 1, 5, 5, 1])  # ties: earlier position
    assert dup.tolist() == [-1, -1, 0, 0, 1]
    keep, dup = dedupe_keep_first(h, 0)
    assert keep.all() and (dup == -1).all()
    hh = np.array([7, 7, 8, 7], np.uint64)
    assert dedupe_keep_first(hh, 0)[1].tolist() == [-1, 0, -1, 0]


def test_exact_duplicates_any_column():
    vals = ["b", "a", "b", None, None, "a", "c"]
    for src in (vals, np.array(vals, dtype=object), pa.array(vals), pa.chunked_array([vals[:3], vals[3:]])):
        keep, dup = exact_duplicates(src)
        assert keep.tolist() == [True, True, False, True, True, False, True]
        assert dup.tolist() == [-1, -1, 0, -1, -1, 1, -1]
    keep, dup = exact_duplicates(["x", "y", "x", "x"], order=["k2", "k0", "k1", "k3"])
    assert dup.tolist() == [2, -1, -1, 2]
    keep, dup = exact_duplicates(np.array([5, 3, 5, 5]))
    assert dup.tolist() == [-1, -1, 0, 0]


def test_identical_hash_heavy_pool_stays_fast():
    """10k copies of one hash (a flat image) plus noise: collapsed before any pair search."""
    rng = np.random.default_rng(11)
    flat = np.full(10_000, 0x8000000000000000, np.uint64)
    near_flat = _flip(flat[:300], rng.integers(1, 5, 300), rng)
    h = rng.permutation(np.concatenate([flat, near_flat, _random(20_000, rng)]))
    t0 = time.perf_counter()
    keep, dup = dedupe_keep_first(h, 8)
    mask, _ = near_any(h, np.array([0x8000000000000001], np.uint64), 8)
    assert time.perf_counter() - t0 < 5
    first_flat = int(np.flatnonzero(h == np.uint64(0x8000000000000000))[0])
    is_flatish = np.bitwise_count(h ^ np.uint64(0x8000000000000000)) <= 4
    assert keep[first_flat] and not keep[is_flatish & (np.arange(len(h)) != first_flat)].any()
    assert (dup[is_flatish & ~keep] == first_flat).all()
    assert keep.sum() == len(h) - is_flatish.sum() + 1  # random hashes are ~32 bits apart
    np.testing.assert_array_equal(mask, np.bitwise_count(h ^ np.uint64(0x8000000000000001)) <= 8)


def test_cost_model_picks_multi_index_at_scale():
    plan = dd._plan(10**7, 10**7, 8, self_join=True)
    assert [(len(c.bits), c.radius) for c in plan] == [(22, 2), (21, 2), (21, 2)]
    assert dd._plan(500, 500, 8, self_join=True) is None  # small: all pairs is cheaper


# ------------------------------------------------------------------ real photographs

PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "rocket", "coins", "horse", "clock", "moon",
          "immunohistochemistry", "hubble_deep_field"]


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


def _copies(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    half = img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    return {
        "original": _jpeg(img),
        "scale0.5": _jpeg(half),
        "scale0.75": _jpeg(img.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC)),
        "jpeg50": _jpeg(img, 50),
        "jpeg30": _jpeg(img, 30),
        "crop2%": _jpeg(_crop(img, 0.01, 0.01, 0.01, 0.01)),  # 2% of each side, 1% off each border
        "crop4%": _jpeg(_crop(img, 0.02, 0.02, 0.02, 0.02)),
        "crop3%left": _jpeg(_crop(img, 0.03, 0, 0, 0)),
        "crop2%corner": _jpeg(_crop(img, 0.02, 0.02, 0, 0)),
        "scale0.5+crop2%+jpeg30": _jpeg(_crop(half, 0.01, 0.01, 0.01, 0.01), 30),
    }


def test_real_photo_copies_are_found_and_distinct_photos_kept_apart():
    cfg = ImageConfig(min_side=32, max_shortest_edge=None, phash="exact")
    names, hexes, photo = [], [], []
    for k, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(skimage.data, name)())
        for variant, data in _copies(img).items():
            r = process_image(data, cfg)  # the stored image's pHash, as ingest records it
            assert r.status == "success" and r.imagehash == phash(Image.open(io.BytesIO(r.data)))
            names.append(f"{name}/{variant}")
            hexes.append(r.imagehash)
            photo.append(k)
    h, photo = hex_to_u64(hexes), np.array(photo)
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    same = photo[:, None] == photo[None, :]
    orig = np.array([n.endswith("/original") for n in names])
    to_orig = dist[:, orig][np.arange(len(h)), photo]  # each copy's distance to its original
    report = {n: int(x) for n, x in zip(names, to_orig)}
    assert to_orig.max() <= DEFAULT_MAX_DISTANCE, report  # recall at the default distance
    assert dist[~same].min() > 2 * DEFAULT_MAX_DISTANCE, dist[~same].min()  # photos stay far apart
    assert (dist % 2 == 0).all()  # pHash sets 32 of 64 bits: distances are even
    # through the API: one cluster per photo, one survivor per photo, nothing near another photo
    np.testing.assert_array_equal(cluster_near_duplicates(h), photo)
    keep, dup = dedupe_keep_first(h, order=names)
    assert keep.sum() == len(PHOTOS) and (photo[dup[~keep]] == photo[~keep]).all()
    assert set(np.array(names)[keep]) == {f"{n}/crop2%" for n in PHOTOS}  # smallest name in each
    mask, ref = near_any(h, h[orig])
    assert mask.all() and (ref == photo).all()
    # bigger crops move more bits (measured: 3% off two borders 2-10, 5% off one side 2-12):
    # still far closer than another photo, but not all within the default distance
    bigger = [hamming(hex_to_u64([phash(_crop(Image.fromarray(getattr(skimage.data, n)()), *c))]),
                      h[names.index(f"{n}/original")])[0]
              for n in PHOTOS[:6] for c in [(0.03, 0.03, 0, 0), (0.05, 0, 0, 0), (0, 0, 0, 0.05)]]
    assert max(bigger) > DEFAULT_MAX_DISTANCE and max(bigger) <= 2 * DEFAULT_MAX_DISTANCE
