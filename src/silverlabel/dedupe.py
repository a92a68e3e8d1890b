"""Exact and near-duplicate search over 64-bit perceptual hashes (pHash).

A sample's ``imagehash`` is the 64-bit pHash written as 16 hex digits
(``str(imagehash.phash(img))``). Two images are *near duplicates* when their hashes
differ in at most ``D`` bits (Hamming distance). This module finds all such pairs in
pools of tens of millions of hashes, clusters them, keeps one sample per cluster, and
checks a pool against a reference set (decontamination against an evaluation set):

    >>> h = hex_to_u64(["c3d4e5f60718293a", "c3d4e5f60718293b", "0123456789abcdef",
    ...                 "c3d4e5f60718293a"])
    >>> keep, dup_of = dedupe_keep_first(h, max_distance=8)
    >>> keep.tolist(), dup_of.tolist()
    ([True, False, True, False], [-1, 0, -1, 0])
    >>> hit, ref = near_any(h, hex_to_u64(["0123456789abcdee"]), max_distance=2)
    >>> hit.tolist(), ref.tolist()
    ([False, False, True, False], [-1, -1, 0, -1])

Hashes are ``uint64`` arrays (:func:`hex_to_u64` parses the column; int64 views, Python
ints and hex strings are converted too); ``max_distance`` is 0..64; ``workers`` is a
thread count (default: all cores); indices returned are positions in the inputs.
:func:`exact_duplicates` gives the same ``(keep, duplicate_of)`` for any column of
equal values (``sha256``).

**Algorithm** (multi-index hashing, Norouzi, Punjani & Fleet, CVPR 2012). Identical
hashes are collapsed first, so ten thousand copies of one flat image cost one hash. The
64 bits are split into ``m`` chunks (interleaved: chunk ``c`` holds bits ``c, c+m,
c+2m, ...``, so the correlated low-frequency DCT bits are spread over all chunks). Write
``D = q*m + a``: two hashes within ``D`` have, by pigeonhole, one of the first ``a+1``
chunks within ``q`` or one of the others within ``q-1`` (else the distance would be at
least ``(a+1)(q+1) + (m-a-1)q = D+1``). For each chunk the hashes are sorted by chunk
value (an offsets table gives each value's run in O(1)); for every flip pattern ``e`` of
weight <= the chunk's radius, each hash is paired with the run of chunk value
``key ^ e`` and the candidates are verified with a 64-bit popcount of the xor. All of it
is vectorised numpy over blocks of 65,536 probes (memory stays bounded: about 1 GiB at
10^7 hashes, the hashes included), on ``workers`` threads (default: all cores). In a
self-join each unordered pair is generated once per chunk (pattern ``e != 0`` is probed
only from the side where the highest bit of ``e`` is 0), and a pair found in chunk ``i``
is dropped when an earlier chunk already qualifies it, so nothing needs de-duplicating.
Everything is exact: every pair within ``D`` is found, none farther is reported.

**Cost.** A chunk of ``b`` bits searched at radius ``r`` costs, per hash,
``V(b, r) = sum_{k<=r} C(b, k)`` lookups and ``V(b, r) * n / 2^b`` candidate checks. A
cost model (constants fitted on the project's 2-core Xeon VM) picks ``m``, about
``64 / log2(n)`` (3 chunks of 21-22 bits at n = 10^7), or the blocked all-pairs
comparison (2.6 ns a pair) where that is cheaper (a few thousand hashes, or large ``D``).
The work grows steeply with ``D``. Measured ``dedupe_keep_first`` on uniform random
hashes, 2 threads (bench/select_bench.py, BENCHMARKS.md):

=========  =====  =====  =====  =====  =====  =====
n          D=4    D=6    D=8    D=10   D=12   D=16
=========  =====  =====  =====  =====  =====  =====
10^6       1.0 s  1.6 s  3.6 s  6.9 s  18 s   92 s
10^7       12 s   30 s   71 s   ~5 min ~16 min ~2 h
=========  =====  =====  =====  =====  =====  =====

(10^7 at D >= 10: the cost model's estimate.) ``near_any`` against 10^5 reference hashes takes
5.5 s at n = 10^7, D = 8 (the pool is indexed, the references probe it). Mind the
transitivity of clusters: at large ``D`` chains link unrelated images (at D = 16 a
million random hashes form a single cluster).

**Distances seen on real copies** (pHash of scikit-image's photographs, see
tests/test_dedupe.py): rescaling (0.25x-0.75x) and JPEG re-compression down to quality
30 move 0-4 bits (quality 10: up to 8); cropping 1% off every border 0-6 bits, 2% off
every border, 2% off two borders or 3% off one side 2-8 bits (up to 10 on some images;
periodic textures such as a brick wall: up to 22), 3% off two borders 2-10, 5% off one
side 2-14; distinct photographs are 20 or more bits apart. pHash sets the 32 of its 64
bits whose DCT coefficient is above the median, so (barring ties) distances are even and
an odd ``D`` finds the same pairs as ``D - 1``. Hence :data:`DEFAULT_MAX_DISTANCE` = 8:
every resize, re-compression and small crop, well below the distance between different
photographs. Clusters are connected components, so a chain of near duplicates forms one
cluster even where its ends are farther apart than ``D``.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from silverlabel.errors import UserError
from silverlabel.options import cpu_count

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "MAX_DISTANCE",
    "hex_to_u64",
    "hex_to_u64_masked",
    "u64_to_hex",
    "hamming",
    "near_pairs",
    "cluster_near_duplicates",
    "dedupe_keep_first",
    "near_any",
    "exact_duplicates",
]

DEFAULT_MAX_DISTANCE = 8
"""Hamming distance under which two pHashes count as the same image (see module docs)."""

MAX_DISTANCE = 64
"""Largest accepted ``max_distance`` (anything above ~20 merges unrelated images)."""

_BLOCK = 1 << 16  # probes (query x pattern) per vectorised step: small enough to stay in cache
_BIG = 1 << 20  # candidates per step of the all-pairs comparison and of very long runs
_DIRECT_MAX_BITS = 24  # chunk values up to this width get an O(1) offsets table
_PACK_MASK = (1 << 24) - 1


# --------------------------------------------------------------------------- conversion

_HEXVAL = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEXVAL[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEXVAL[_c] = 10 + _i


def _nibbles_to_u64(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) ASCII bytes -> (uint64 values, valid mask)."""
    d = _HEXVAL[raw]
    ok = (d < 16).all(axis=1)
    d = np.where(ok[:, None], d, 0).astype(np.uint8)
    packed = np.ascontiguousarray((d[:, 0::2] << 4) | d[:, 1::2])
    return packed.view(">u8").ravel().astype(np.uint64), ok


def _arrow_strings(hexes: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(hexes, (pa.Array, pa.ChunkedArray)):
        arr = hexes
    elif isinstance(hexes, np.ndarray) and hexes.dtype.kind == "S":
        arr = pa.array(hexes, type=pa.binary())
    else:
        try:
            arr = pa.array(hexes if isinstance(hexes, np.ndarray) else list(hexes), type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise UserError(f"expected 16-hex-digit strings: {e}") from None
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
            or pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise UserError(f"expected 16-hex-digit strings, got an array of {arr.type}")
    return arr


def _parse_arrow_chunk(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    bufs = arr.buffers()
    off_t = np.int64 if (pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)) else np.int32
    offsets = np.frombuffer(bufs[1], dtype=off_t)[arr.offset: arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lens = np.diff(offsets)
    present = lens == 16
    if arr.null_count:
        present &= arr.is_valid().to_numpy(zero_copy_only=False)
    if present.all() and offsets[-1] - offsets[0] == 16 * n:  # the usual case: one contiguous block
        return _nibbles_to_u64(data[offsets[0]: offsets[-1]].reshape(n, 16))
    vals = np.zeros(n, np.uint64)
    ok = np.zeros(n, bool)
    step = 1 << 18
    for a in range(0, n, step):
        rows = a + np.flatnonzero(present[a: a + step])
        if rows.size:
            raw = data[offsets[rows][:, None] + np.arange(16)]
            vals[rows], ok[rows] = _nibbles_to_u64(raw)
    return vals, ok


def hex_to_u64_masked(hexes: Sequence[str | None] | pa.Array | pa.ChunkedArray | np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Parse 16-hex-digit hashes; bad or missing values give 0 and ``False`` in the mask.

    >>> vals, ok = hex_to_u64_masked(["8000000000000000", None, "xyz", "FFFFFFFFFFFFFFFF"])
    >>> [hex(int(v)) for v in vals], ok.tolist()
    (['0x8000000000000000', '0x0', '0x0', '0xffffffffffffffff'], [True, False, False, True])
    """
    if isinstance(hexes, np.ndarray) and hexes.dtype.kind in "iu":
        return _as_u64(hexes, "hexes"), np.ones(len(hexes), bool)
    arr = _arrow_strings(hexes)
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    parts = [_parse_arrow_chunk(c) for c in chunks]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def hex_to_u64(hexes: Sequence[str] | pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """Parse 16-hex-digit hashes (``imagehash`` column values) into ``uint64``.

    Accepts a list of str, a numpy str/bytes/object array or a pyarrow string array
    (a 10^7-row arrow column parses in well under a second). The integer is the hex
    number itself, so ``u64_to_hex`` gives the string back. An integer array is returned
    as ``uint64`` unchanged. A null, a wrong length or a non-hex digit raises
    ``ValueError`` naming the first bad value; :func:`hex_to_u64_masked` masks them instead.

    >>> hex_to_u64(["8000000000000000", "00000000000000ff"]).tolist()
    [9223372036854775808, 255]
    >>> hex_to_u64(["8000000000000000", "123"])
    Traceback (most recent call last):
    ...
    silverlabel.errors.UserError: not a 16-hex-digit hash at row 1: '123'
    """
    vals, ok = hex_to_u64_masked(hexes)
    if not ok.all():
        i = int(np.argmin(ok))
        if isinstance(hexes, (pa.Array, pa.ChunkedArray)):
            bad = hexes[i].as_py()
        else:
            bad = hexes[i]
        if isinstance(bad, bytes):
            bad = bad.decode("ascii", "replace")
        raise UserError(f"not a 16-hex-digit hash at row {i}: {bad!r}")
    return vals


def u64_to_hex(values: np.ndarray | Sequence[int]) -> list[str]:
    """Format ``uint64`` hashes as 16 hex digits (the inverse of :func:`hex_to_u64`).

    >>> u64_to_hex(hex_to_u64(["c3d4e5f60718293a"]))
    ['c3d4e5f60718293a']
    """
    return [f"{int(v):016x}" for v in _as_u64(values, "values")]


def _as_u64(x: Any, name: str) -> np.ndarray:
    """A 1-D ``uint64`` array from uint64/int64 arrays, Python ints or hex strings."""
    if isinstance(x, (pa.Array, pa.ChunkedArray)):
        if pa.types.is_integer(x.type):
            x = x.to_numpy(zero_copy_only=False)
        else:
            return hex_to_u64(x)
    a = np.asarray(x)
    if a.ndim != 1:
        if a.ndim == 0 or a.size == 0:
            a = a.reshape(-1)
        else:
            raise UserError(f"{name}: expected a 1-D array of hashes, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, np.uint64)
    if a.dtype == np.uint64:
        return a
    if a.dtype == np.int64:
        return a.view(np.uint64)  # same 64 bits (e.g. a hash stored in a signed column)
    if a.dtype.kind in "iu":
        if a.dtype.kind == "i" and (a < 0).any():
            raise UserError(f"{name}: negative values in a {a.dtype} array are not 64-bit hashes")
        return a.astype(np.uint64)
    if a.dtype.kind in "USO":
        if a.dtype.kind == "O" and all(isinstance(v, int) for v in a[:100].tolist()):
            try:
                return np.array(a.tolist(), dtype=np.uint64)
            except OverflowError:
                raise UserError(f"{name}: integers must be in 0 .. 2**64-1") from None
        return hex_to_u64(a)
    raise UserError(f"{name}: expected 64-bit hashes (uint64 or 16-hex strings), got dtype {a.dtype}")


def _workers(workers: int | None) -> int:
    if workers is None:
        return cpu_count()
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise UserError(f"workers must be a positive integer or None, got {workers!r}")
    return int(workers)


def _check_distance(max_distance: Any) -> int:
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
        raise UserError(f"max_distance must be an integer, got {max_distance!r}")
    d = int(max_distance)
    if not 0 <= d <= MAX_DISTANCE:
        raise UserError(f"max_distance must be in 0..{MAX_DISTANCE}, got {d}")
    return d


# --------------------------------------------------------------------------- popcount

if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)

    def _popcount_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x, out=out)

else:  # pragma: no cover - numpy 1.x
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        by = x.view(np.uint8).reshape(x.shape + (x.dtype.itemsize,))
        return _POP8[by].sum(axis=-1, dtype=np.uint8)

    def _popcount_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return _popcount(x)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Hamming distance ``popcount(a ^ b)`` of uint64 hashes (broadcasts).

    >>> hamming(np.array([0b1011], np.uint64), np.array([0b0001, 0b1011], np.uint64)).tolist()
    [2, 0]
    """
    a = np.asarray(a)
    b = np.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in (np.uint64, np.int64):
            raise UserError(f"hamming: {name} must be uint64 (or int64) hashes, got {x.dtype}")
    return _popcount(a.view(np.uint64) ^ b.view(np.uint64))


# --------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class _Chunk:
    bits: tuple[int, ...]  # hash bit positions (0 = least significant) making up the chunk value
    radius: int  # search radius within the chunk


def _vol(b: int, r: int) -> int:
    """Number of flip patterns of weight <= r on b bits."""
    return sum(math.comb(b, k) for k in range(r + 1))


def _chunks(m: int, d: int) -> list[_Chunk]:
    """Multi-index chunks for distance d with m interleaved substrings (radius -1 dropped)."""
    q, a = divmod(d, m)
    out = []
    for c in range(m):
        r = q if c <= a else q - 1
        if r >= 0:
            out.append(_Chunk(tuple(range(c, 64, m)), r))
    return out


# Cost constants, nanoseconds, fitted on timings of this module (numpy 2.4, the project's
# 2-core Xeon VM, one thread); they only have to rank the plans, not predict the time.
_NS_CAND = 3.0  # verify one candidate pair (gather, xor, popcount, compare)
_NS_CAND_BIG = 6.0  # ... when the table no longer fits in the cache (more than ~2M hashes)
_NS_PROBE = 7.0  # one (query, pattern) lookup in a direct offsets table
_NS_SEARCH = 40.0  # ... by binary search (chunks wider than 24 bits)
_NS_SORT = 100.0  # key extraction + sort + table, per hash and chunk
_NS_BRUTE = 2.6  # one pair in the blocked all-pairs comparison
_NS_PATTERN = 20000.0  # Python overhead per flip pattern


def _is_direct(b: int, n: int) -> bool:
    """Whether a b-bit chunk of n hashes gets a direct offsets table (else binary search)."""
    return b <= 22 or (b <= _DIRECT_MAX_BITS and (1 << b) <= 16 * n)


def _mih_cost(chunks: list[_Chunk], nq: int, nt: int, self_join: bool) -> float:
    cost = 0.0
    for ch in chunks:
        b = len(ch.bits)
        pats = _vol(b, ch.radius)
        direct = _is_direct(b, nt)
        probe = _NS_PROBE if direct else _NS_SEARCH
        per_cand = _NS_CAND_BIG if nt > 2_000_000 else _NS_CAND
        if self_join:
            cand = pats * nt * (nt / 2) / 2.0**b
            probes = (pats - 1) * nq / 2 + nq
        else:
            cand = pats * nq * nt / 2.0**b
            probes = pats * nq
        cost += (nq + nt) * _NS_SORT + probes * probe + cand * per_cand + pats * _NS_PATTERN
        if direct:
            cost += (1 << b) * 5.0  # building the offsets table
    return cost


def _plan(nq: int, nt: int, d: int, self_join: bool) -> list[_Chunk] | None:
    """The cheapest exact plan: a list of chunks, or None for the all-pairs comparison."""
    pairs = nq * (nt - 1) / 2 if self_join else nq * nt
    best_cost, best = pairs * _NS_BRUTE + 1e5, None
    for m in range(1, min(d + 1, 16) + 1):
        chunks = _chunks(m, d)
        if max(_vol(len(c.bits), c.radius) for c in chunks) > 2_000_000:
            continue
        cost = _mih_cost(chunks, nq, nt, self_join)
        if cost < best_cost:
            best_cost, best = cost, chunks
    return best


# --------------------------------------------------------------------------- chunk tables

@functools.lru_cache(maxsize=64)
def _key_luts(bits: tuple[int, ...]) -> tuple[tuple[int, np.ndarray], ...]:
    """Per hash byte: a 256-entry table giving that byte's contribution to the chunk value."""
    dtype = np.uint32 if len(bits) <= 32 else np.uint64
    v = np.arange(256)
    luts = []
    for byte in range(8):
        lut = np.zeros(256, dtype=dtype)
        for pos, bit in enumerate(bits):
            if bit // 8 == byte:
                lut |= (((v >> (bit % 8)) & 1) << pos).astype(dtype)
        if lut.any():
            luts.append((byte, lut))
    return tuple(luts)


def _chunk_keys(h: np.ndarray, bits: tuple[int, ...]) -> np.ndarray:
    by = h.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)
    key = None
    for byte, lut in _key_luts(bits):
        part = lut[by[:, byte]]
        if key is None:
            key = part
        else:
            key |= part
    return key


class _Table:
    """Hashes sorted by one chunk value, with O(1) (or O(log n)) lookup of a value's run."""

    def __init__(self, h: np.ndarray, chunk: _Chunk):
        self.b = b = len(chunk.bits)
        key = _chunk_keys(h, chunk.bits)
        n = len(h)
        if b <= 32 and n < (1 << 32):  # sort (key, index) packed in one uint64: ~5x faster than argsort
            packed = np.sort((key.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64))
            self.perm = (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)
            self.keys = (packed >> np.uint64(32)).astype(key.dtype)
            del packed
        else:
            self.perm = np.argsort(key, kind="stable")
            self.keys = key[self.perm]
        self.hashes = h[self.perm]
        self.direct = _is_direct(b, n)
        if self.direct:
            counts = np.bincount(self.keys, minlength=1 << b)
            self.offsets = np.zeros((1 << b) + 1, dtype=np.int64)
            np.cumsum(counts, out=self.offsets[1:])
            # one gather per probe: start << 24 | count (counts >= 2^24 - 1 looked up again)
            self.packed = (self.offsets[:-1] << 24) | np.minimum(counts, _PACK_MASK)
            self.overfull = bool(counts.max(initial=0) >= _PACK_MASK)
        else:
            first = np.ones(n, bool)
            first[1:] = self.keys[1:] != self.keys[:-1]
            starts = np.flatnonzero(first)
            self.ukeys = self.keys[starts]
            self.ustart = starts
            self.uend = np.append(starts[1:], n)

    def lookup(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) of the sorted run holding chunk value ``v`` (count 0: none)."""
        if self.direct:
            p = self.packed[v]
            c = p & _PACK_MASK
            p >>= 24
            if self.overfull:
                big = np.flatnonzero(c == _PACK_MASK)
                c[big] = self.offsets[v[big] + 1] - p[big]
            return p, c
        if len(self.ukeys) == 0:
            return np.zeros(len(v), np.int64), np.zeros(len(v), np.int64)
        i = np.searchsorted(self.ukeys, v)
        np.minimum(i, len(self.ukeys) - 1, out=i)
        found = self.ukeys[i] == v
        s = self.ustart[i]
        c = np.where(found, self.uend[i] - s, 0)
        return s, c

    def run_end(self) -> np.ndarray:
        """For every sorted position, the end of the run of equal chunk values it is in."""
        if self.direct:
            return self.offsets[self.keys.astype(np.int64) + 1]
        i = np.searchsorted(self.ukeys, self.keys)
        return self.uend[i]


def _patterns(b: int, r: int) -> list[np.ndarray]:
    """Non-zero flip patterns of weight <= r over b bits, grouped by their highest bit."""
    dtype = np.uint32 if b <= 32 else np.uint64
    groups: list[list[int]] = [[] for _ in range(b)]
    for w in range(1, r + 1):
        for comb in itertools.combinations(range(b), w):
            groups[comb[-1]].append(sum(1 << i for i in comb))
    return [np.array(g, dtype=dtype) for g in groups]


class _Scratch(threading.local):
    """Per-thread reusable buffers for :func:`_verify` (no page faults in the hot loop)."""

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if getattr(self, "size", 0) < n:
            self.size = max(n, _BLOCK)
            self.h = np.empty(self.size, np.uint64)
            self.c = np.empty(self.size, np.uint8)
            self.b = np.empty(self.size, bool)
        return self.h[:n], self.c[:n], self.b[:n]


_SCRATCH = _Scratch()
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8))


def _verify(qh: np.ndarray, qdiv: int, s: np.ndarray, c: np.ndarray, hs: np.ndarray, d: int,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the candidate ranges ``[s[r], s[r] + c[r])`` of the sorted table hashes ``hs``
    against the query hash ``qh[r // qdiv]``; return (range, table position, distance) of
    every pair within ``d``.

    Step 0 checks the first entry of every non-empty range; the ranges with more entries
    are then ordered by length (a radix sort of small ints), so those still live at step
    ``t`` are a prefix: each step is one gather, xor, popcount and compare over that
    prefix, in reused buffers, with no per-candidate index arrays. Entries past the 255th
    of a range go through :func:`_verify_flat`.
    """
    live = np.flatnonzero(c != 0)  # (a bool mask: nonzero on int64 is 5x slower)
    if live.size == 0:
        return _EMPTY
    s0 = s[live]
    q0 = qh[live // qdiv] if qdiv != 1 else qh[live]
    buf, cnt, hitbuf = _SCRATCH.get(len(live))
    out_r, out_p, out_d = [], [], []
    # step 0 on every live range (most ranges are short: sorting them would cost more)
    g = hs.take(s0)
    np.bitwise_xor(g, q0, out=g)
    x = _popcount_into(g, cnt)
    hit = np.flatnonzero(x <= d)
    if hit.size:
        out_r.append(live[hit])
        out_p.append(s0[hit])
        out_d.append(x[hit])
    c0 = c[live]
    rest = np.flatnonzero(c0 > 1)
    if rest.size:
        c8 = (np.minimum(c0[rest], 255) - 1).astype(np.uint8)  # candidates left after step 0
        hist = np.bincount(c8, minlength=256)
        o = rest[np.argsort(~c8, kind="stable")]  # longest first: the live ranges are a prefix
        ss = s0[o]
        q = q0[o]
        more = len(o) - np.cumsum(hist[1:])  # more[t - 1]: ranges with more than t left
        n_t = len(o)
        for t in range(1, 255):
            if t > 1:
                n_t = int(more[t - 2])
                if n_t == 0:
                    break
            idx = ss[:n_t]
            g = hs[t:].take(idx)  # hs[idx + t], without computing idx + t
            np.bitwise_xor(g, q[:n_t], out=g)
            x = _popcount_into(g, cnt[:n_t])
            ok = np.less_equal(x, d, out=hitbuf[:n_t])
            if ok.any():
                hit = np.flatnonzero(ok)
                out_r.append(live[o[hit]])
                out_p.append(idx[hit] + t)
                out_d.append(x[hit])
    big = np.flatnonzero(c > 255)
    if big.size:  # the rest of runs longer than 255
        ri, pos, dist = _verify_flat(qh[big // qdiv], s[big] + 255, c[big] - 255, hs, d)
        out_r.append(big[ri])
        out_p.append(pos)
        out_d.append(dist)
    if not out_r:
        return _EMPTY
    return np.concatenate(out_r), np.concatenate(out_p), np.concatenate(out_d)


def _verify_flat(qh: np.ndarray, s: np.ndarray, c: np.ndarray, hs: np.ndarray, d: int,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_verify` for a few long ranges (one query hash each): explicit candidate lists
    in blocks of about ``_BIG`` candidates."""
    if c.max() > _BIG:  # split giant runs so every block stays bounded
        pieces = (c + _BIG - 1) // _BIG
        rep = np.repeat(np.arange(len(c)), pieces)
        k = np.arange(len(rep)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        ri, pos, dist = _verify_flat(qh[rep], s[rep] + k * _BIG, np.minimum(_BIG, c[rep] - k * _BIG), hs, d)
        return rep[ri], pos, dist
    cs = np.cumsum(c)
    out_r, out_p, out_d = [], [], []
    a, n = 0, len(c)
    while a < n:
        base = cs[a - 1] if a else 0
        e = max(a + 1, int(np.searchsorted(cs, base + _BIG, side="right")))
        cb = c[a:e]
        excl = cs[a:e] - cb - base  # exclusive cumsum within the block
        pos = np.repeat(s[a:e] - excl, cb)
        pos += np.arange(len(pos))
        dist = _popcount(hs[pos] ^ np.repeat(qh[a:e], cb))
        hit = np.flatnonzero(dist <= d)
        if hit.size:
            out_r.append(a + np.searchsorted(excl, hit, side="right") - 1)
            out_p.append(pos[hit])
            out_d.append(dist[hit])
        a = e
    if not out_r:
        return _EMPTY
    return np.concatenate(out_r), np.concatenate(out_p), np.concatenate(out_d)


def _run_tasks(fn, tasks: list, weights: list[float], workers: int) -> list:
    """``[fn(t) for t in tasks]``, on ``workers`` threads (numpy releases the GIL in the
    vectorised steps); the heaviest tasks start first, results come back in task order."""
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(range(len(tasks)), key=lambda i: -weights[i])
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futs = {i: ex.submit(fn, tasks[i]) for i in order}
        return [futs[i].result() for i in range(len(tasks))]


def _seen_earlier(hi: np.ndarray, hj: np.ndarray, earlier: list[_Chunk]) -> np.ndarray:
    """Pairs that an earlier chunk of the plan qualifies (and so already reported)."""
    seen = np.zeros(len(hi), bool)
    for ch in earlier:
        dk = _popcount(_chunk_keys(hi, ch.bits) ^ _chunk_keys(hj, ch.bits))
        seen |= dk <= ch.radius
    return seen


# --------------------------------------------------------------------------- joins (unique hashes)

def _brute_self(h: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(h)
    out_i, out_j = [], []
    rows = max(1, _BIG // max(n, 1))
    for a in range(0, n - 1, rows):
        e = min(n, a + rows)
        dist = _popcount(h[a:e, None] ^ h[None, a:])  # (e-a, n-a); columns start at a
        ii, jj = np.nonzero(dist <= d)
        jj += a
        ii += a
        keep = jj > ii
        out_i.append(ii[keep])
        out_j.append(jj[keep])
    if not out_i:
        z = np.zeros(0, np.int64)
        return z, z
    return np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64)


def _brute_cross(q: np.ndarray, t: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out_i, out_j, out_d = [], [], []
    rows = max(1, _BIG // max(len(t), 1))
    for a in range(0, len(q), rows):
        dist = _popcount(q[a:a + rows, None] ^ t[None, :])
        ii, jj = np.nonzero(dist <= d)
        out_i.append(ii + a)
        out_j.append(jj)
        out_d.append(dist[ii, jj])
    if not out_i:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.uint8)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d))


def _self_pairs(h: np.ndarray, d: int, plan: list[_Chunk] | None = None, workers: int = 1,
                ) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j), i < j, with hamming(h[i], h[j]) <= d, for *distinct* hashes h."""
    n = len(h)
    z = np.zeros(0, np.int64)
    if n < 2:
        return z, z
    if plan is None:
        plan = _plan(n, n, d, self_join=True)
    if plan is None:
        return _brute_self(h, d)
    out_i, out_j = [], []
    for ci, ch in enumerate(plan):
        t = _Table(h, ch)
        run_end = t.run_end()

        def same_value(_):  # pattern 0: pairs inside a run of equal chunk values, from the lower one
            fq, ft = [], []
            for a in range(0, n, _BLOCK):
                e = min(n, a + _BLOCK)
                s = np.arange(a + 1, e + 1, dtype=np.int64)
                ri, pos, _ = _verify(t.hashes[a:e], 1, s, run_end[a:e] - s, t.hashes, d)
                fq.append(a + ri)
                ft.append(pos)
            return fq, ft

        def flipped(task):  # patterns e != 0 with highest bit hb, probed where bit hb is 0
            hb, pats = task
            qpos = np.flatnonzero(((t.keys >> t.keys.dtype.type(hb)) & 1) == 0)
            step = max(1, _BLOCK // len(pats))
            fq, ft = [], []
            for a in range(0, len(qpos), step):
                qp = qpos[a:a + step]
                s, c = t.lookup((t.keys[qp][:, None] ^ pats[None, :]).ravel())
                ri, pos, _ = _verify(t.hashes[qp], len(pats), s, c, t.hashes, d)
                fq.append(qp[ri // len(pats)])
                ft.append(pos)
            return fq, ft

        groups = [(hb, p) for hb, p in enumerate(_patterns(len(ch.bits), ch.radius)) if p.size]
        tasks = [None] + groups
        weights = [1.0] + [float(len(p)) / 2 for _, p in groups]
        fns = [same_value] + [flipped] * len(groups)
        results = _run_tasks(lambda k: fns[k](tasks[k]), list(range(len(tasks))), weights, workers)
        qi = t.perm[np.concatenate([x for fq, _ in results for x in fq])]
        tj = t.perm[np.concatenate([x for _, ft in results for x in ft])]
        if ci and len(qi):
            fresh = ~_seen_earlier(h[qi], h[tj], plan[:ci])
            qi, tj = qi[fresh], tj[fresh]
        out_i.append(np.minimum(qi, tj))
        out_j.append(np.maximum(qi, tj))
        del t, run_end, results
    return np.concatenate(out_i), np.concatenate(out_j)


def _cross_pairs(q: np.ndarray, t: np.ndarray, d: int, workers: int = 1,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, distance) with hamming(q[i], t[j]) <= d (repeated hashes allowed on either side)."""
    z = np.zeros(0, np.int64)
    if len(q) == 0 or len(t) == 0:
        return z, z, np.zeros(0, np.uint8)
    plan = _plan(len(q), len(t), d, self_join=False)
    plan_sw = _plan(len(t), len(q), d, self_join=False)

    def cost(p, a, b):
        return len(a) * len(b) * _NS_BRUTE if p is None else _mih_cost(p, len(a), len(b), False)

    if cost(plan_sw, t, q) < cost(plan, q, t):  # index the side that makes probing cheaper
        j, i, dist = _cross_pairs_plan(t, q, d, plan_sw, workers)
        return i, j, dist
    return _cross_pairs_plan(q, t, d, plan, workers)


def _cross_pairs_plan(q: np.ndarray, t: np.ndarray, d: int, plan: list[_Chunk] | None, workers: int):
    if plan is None:
        return _brute_cross(q, t, d)
    out_i, out_j, out_d = [], [], []
    for ci, ch in enumerate(plan):
        tab = _Table(t, ch)
        qkeys = _chunk_keys(q, ch.bits)
        pats = np.concatenate([np.zeros(1, qkeys.dtype)] + _patterns(len(ch.bits), ch.radius)).astype(qkeys.dtype)
        step = max(1, _BLOCK // len(pats))
        starts = list(range(0, len(q), step))

        def probe(a):
            s, c = tab.lookup((qkeys[a:a + step, None] ^ pats[None, :]).ravel())
            ri, pos, dist = _verify(q[a:a + step], len(pats), s, c, tab.hashes, d)
            return a + ri // len(pats), tab.perm[pos], dist

        results = _run_tasks(probe, starts, [1.0] * len(starts), workers)
        qi = np.concatenate([r[0] for r in results])
        tj = np.concatenate([r[1] for r in results])
        dd = np.concatenate([r[2] for r in results])
        if ci and len(qi):
            fresh = ~_seen_earlier(q[qi], t[tj], plan[:ci])
            qi, tj, dd = qi[fresh], tj[fresh], dd[fresh]
        out_i.append(qi)
        out_j.append(tj)
        out_d.append(dd)
        del tab, results
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def _unique(h: np.ndarray, first: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(distinct sorted hashes, inverse, index of the first occurrence of each if ``first``)."""
    n = len(h)
    if n == 0:
        z = np.zeros(0, np.int64)
        return h, z, z
    perm = np.argsort(h)  # not stable (2x faster): first occurrences are computed below
    hs = h[perm]
    new = np.ones(n, bool)
    new[1:] = hs[1:] != hs[:-1]
    uid = np.cumsum(new) - 1
    inverse = np.empty(n, np.int64)
    inverse[perm] = uid
    firsts = None
    if first:
        firsts = np.full(int(uid[-1]) + 1, n, np.int64)
        np.minimum.at(firsts, inverse, np.arange(n))
    return hs[new], inverse, firsts


# --------------------------------------------------------------------------- public API

def near_pairs(hashes: np.ndarray, max_distance: int, *, workers: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``(i, j)``, ``i < j``, with ``hamming(hashes[i], hashes[j]) <= max_distance``.

    Exact (no pair missed, none farther reported), each pair once, sorted by ``(i, j)``.
    The output grows with the square of the copies of one hash (10^4 identical hashes make
    5*10^7 pairs); :func:`cluster_near_duplicates` and :func:`dedupe_keep_first` never
    expand those and stay linear.

    >>> h = np.array([0b0000, 0b0011, 0b1111, 0b0000], dtype=np.uint64)
    >>> i, j = near_pairs(h, 2)
    >>> list(zip(i.tolist(), j.tolist()))
    [(0, 1), (0, 3), (1, 2), (1, 3)]
    """
    d = _check_distance(max_distance)
    h = _as_u64(hashes, "hashes")
    u, inv, _ = _unique(h)
    ui, uj = _self_pairs(u, d, workers=_workers(workers))
    # members of each distinct hash, in index order
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=len(u))
    start = np.cumsum(counts) - counts
    parts_i, parts_j = [], []
    # pairs among copies of one hash: each member with every later member
    if (counts > 1).any():
        pos = np.arange(len(order), dtype=np.int64)
        run_end = (start + counts)[inv[order]]
        cnt = run_end - pos - 1
        first = np.repeat(pos - (np.cumsum(cnt) - cnt), cnt)
        later = first + np.arange(len(first)) + 1
        parts_i.append(order[np.repeat(pos, cnt)])
        parts_j.append(order[later])
    # pairs between copies of two near hashes
    if len(ui):
        cnt = counts[ui] * counts[uj]
        p = np.repeat(np.arange(len(ui)), cnt)
        k = np.arange(len(p)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cj = counts[uj][p]
        x = order[start[ui][p] + k // cj]
        y = order[start[uj][p] + k % cj]
        parts_i.append(np.minimum(x, y))
        parts_j.append(np.maximum(x, y))
    if not parts_i:
        z = np.zeros(0, np.int64)
        return z, z
    i = np.concatenate(parts_i).astype(np.int64)
    j = np.concatenate(parts_j).astype(np.int64)
    o = np.lexsort((j, i))
    return i[o], j[o]


def _components(h: np.ndarray, d: int, workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(component label per element, inverse to distinct hashes); labels consecutive by first appearance."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    u, inv, _ = _unique(h)
    ui, uj = _self_pairs(u, d, workers=_workers(workers)) if d > 0 else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(ui):
        g = coo_matrix((np.ones(len(ui), np.int8), (ui, uj)), shape=(len(u), len(u))).tocsr()
        _, comp = connected_components(g, directed=False)
    else:
        comp = np.arange(len(u))
    lab = comp[inv]
    # relabel 0, 1, 2, ... in order of first appearance
    k = int(lab.max()) + 1 if len(lab) else 0
    first = np.full(k, len(lab), np.int64)
    np.minimum.at(first, lab, np.arange(len(lab)))
    rank = np.empty(k, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(k)
    return rank[lab], inv


def cluster_near_duplicates(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE, *,
                            workers: int | None = None) -> np.ndarray:
    """Cluster label per hash: connected components of the "within ``max_distance``" graph.

    Transitive (a~b and b~c put a, b, c in one cluster even when a and c are farther apart).
    Labels are ``0, 1, 2, ...`` in order of each cluster's first element.

    >>> cluster_near_duplicates(np.array([0b0000, 0b1111, 0b0011, 0xF0], dtype=np.uint64), 2).tolist()
    [0, 0, 0, 1]
    """
    d = _check_distance(max_distance)
    h = _as_u64(hashes, "hashes")
    return _components(h, d, workers)[0]


def _ranks(order: Any, n: int) -> np.ndarray:
    """Position of each element in ``order`` (ascending, stable; ties by position)."""
    if order is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(order, (pa.Array, pa.ChunkedArray)):
        import pyarrow.compute as pc

        if len(order) != n:
            raise UserError(f"order has {len(order)} values for {n} hashes")
        perm = pc.array_sort_indices(order, null_placement="at_end").to_numpy().astype(np.int64)
    else:
        a = np.asarray(order)
        if a.ndim != 1 or len(a) != n:
            raise UserError(f"order must be 1-D with {n} values, got shape {a.shape}")
        try:
            perm = np.argsort(a, kind="stable")
        except TypeError as e:
            raise UserError(f"order values cannot be sorted (mixed types or None?): {e}") from None
    rank = np.empty(n, np.int64)
    rank[perm] = np.arange(n, dtype=np.int64)
    return rank


def _keep_first(labels: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within each label keep the element of smallest rank; others point to it."""
    n = len(labels)
    keep = np.ones(n, bool)
    dup_of = np.full(n, -1, np.int64)
    if n == 0:
        return keep, dup_of
    sizes = np.bincount(labels)
    multi = np.flatnonzero(sizes[labels] > 1)  # only members of clusters with >= 2 elements
    if multi.size == 0:
        return keep, dup_of
    o = np.lexsort((rank[multi], labels[multi]))  # by cluster, best rank first
    members = multi[o]
    lab = labels[members]
    head = np.ones(len(members), bool)
    head[1:] = lab[1:] != lab[:-1]
    keeper = members[head][np.cumsum(head) - 1]
    gone = ~head
    keep[members[gone]] = False
    dup_of[members[gone]] = keeper[gone]
    return keep, dup_of


def dedupe_keep_first(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE,
                      order: np.ndarray | pa.Array | Sequence | None = None, *, workers: int | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Keep one hash per near-duplicate cluster: ``(keep_mask, duplicate_of)``.

    Clusters are those of :func:`cluster_near_duplicates`. In each, the element that
    sorts first by ``order`` (any sortable values, e.g. the sample keys; default: the
    position) is kept, ties going to the earlier position; ``duplicate_of[i]`` is the
    index of the kept element of ``i``'s cluster (``-1`` for kept elements). Through
    transitivity that element may be farther than ``max_distance`` from ``i``.
    ``max_distance=0`` removes identical hashes only.

    >>> h = np.array([0b0011, 0b0001, 0b0000, 0xFF00], dtype=np.uint64)
    >>> keep, dup = dedupe_keep_first(h, 1, order=["k3", "k2", "k1", "k0"])
    >>> keep.tolist(), dup.tolist()
    ([False, False, True, True], [2, 2, -1, -1])
    """
    d = _check_distance(max_distance)
    h = _as_u64(hashes, "hashes")
    rank = _ranks(order, len(h))
    labels, _ = _components(h, d, workers)
    return _keep_first(labels, rank)


def exact_duplicates(values: Sequence | np.ndarray | pa.Array | pa.ChunkedArray,
                     order: np.ndarray | pa.Array | Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(keep_mask, duplicate_of)`` for equal values (e.g. the ``sha256`` column).

    Same contract as :func:`dedupe_keep_first` with equality instead of distance. Null
    / ``None`` values are never duplicates of anything (each is kept).

    >>> keep, dup = exact_duplicates(["b", "a", "b", None, None, "a"])
    >>> keep.tolist(), dup.tolist()
    ([True, True, False, True, True, False], [-1, -1, 0, -1, -1, 1])
    """
    n = len(values)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        import pyarrow.compute as pc

        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        enc = pc.dictionary_encode(values)
        codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        null = codes < 0
    else:
        a = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if a.ndim != 1:
            a = np.empty(n, dtype=object)
            a[:] = list(values)
        if a.dtype.kind != "O":
            _, codes = np.unique(a, return_inverse=True)
            codes = codes.astype(np.int64).reshape(-1)
            null = np.zeros(n, bool)
        else:
            table: dict = {}
            codes = np.fromiter((-1 if v is None else table.setdefault(v, len(table)) for v in a.tolist()),
                                dtype=np.int64, count=n)
            null = codes < 0
    if null.any():  # every null its own group
        k = int(codes.max()) + 1 if (~null).any() else 0
        codes = codes.copy()
        codes[null] = k + np.arange(int(null.sum()))
    rank = _ranks(order, n)
    return _keep_first(codes, rank)


def near_any(pool: np.ndarray, reference: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE, *,
             workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which pool hashes lie within ``max_distance`` of some reference hash (decontamination).

    Returns ``(mask, ref_index)``: ``mask[i]`` is True when some ``reference[k]`` has
    ``hamming(pool[i], reference[k]) <= max_distance``; ``ref_index[i]`` is the nearest
    such ``k`` (smallest distance, then smallest index), ``-1`` where there is none.

    >>> pool = np.array([0b0000, 0b0111, 0xFF00], dtype=np.uint64)
    >>> mask, ref = near_any(pool, np.array([0xFF03, 0b0001], dtype=np.uint64), 2)
    >>> mask.tolist(), ref.tolist()
    ([True, True, True], [1, 1, 0])
    """
    d = _check_distance(max_distance)
    p = _as_u64(pool, "pool")
    r = _as_u64(reference, "reference")
    mask = np.zeros(len(p), bool)
    ref_index = np.full(len(p), -1, np.int64)
    if len(p) == 0 or len(r) == 0:
        return mask, ref_index
    ru, _, rfirst = _unique(r, first=True)  # the pool is searched as is: no need to collapse it
    i, j, dist = _cross_pairs(p, ru, d, workers=_workers(workers))
    if len(i):
        o = np.lexsort((rfirst[j], dist, i))  # per pool hash: nearest, then smallest reference index
        i, j = i[o], j[o]
        first = np.ones(len(i), bool)
        first[1:] = i[1:] != i[:-1]
        ref_index[i[first]] = rfirst[j[first]]
        mask[i[first]] = True
    return mask, ref_index
