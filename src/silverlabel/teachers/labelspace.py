"""Label spaces (in1k, in12k, in21k) and the mapping of teacher outputs between them.

A label space is an ordered tuple of ImageNet wnids; a class index is a position in it.

- ``in1k``: the 1000 ImageNet-1k classes in the standard class-index order
  (timm's ``imagenet_synsets.txt``).
- ``in12k``: the 11,821 ImageNet-12k classes (timm's ``imagenet12k_synsets.txt``, sorted;
  a subset of in21k).
- ``in21k``: the 21,841 ImageNet-21k fall11 synsets in sorted-wnid order (timm's
  ``imagenet22k_synsets.txt``) - silverlabel's default output space (COYO-Labeled-300M's).

Human names come from timm's ``imagenet_synset_to_lemma.txt`` (the first lemma).

    >>> in1k, in21k = get_label_space("in1k"), get_label_space("in21k")
    >>> len(in1k), len(in21k), in1k.wnids[285], in1k.lemma(285)
    (1000, 21841, 'n02124075', 'Egyptian cat')
    >>> in1k.find("egyptian cat"), in1k.find("n02124075"), in1k.find("285")
    ([285], [285], [285])
    >>> m = index_map(in1k, in21k)
    >>> in21k.wnids[m[285]]
    'n02124075'

**Classes a target space lacks.** Mapping in1k -> in21k, exactly one ImageNet-1k class is
absent from the fall11 list: ``n04399382`` *teddy, teddy bear* (in1k index 850). Its only
WordNet parent, ``n03964744`` *plaything, toy*, is not a fall11 synset either, so under the
default ``policy="ancestor"`` its probability goes to the next ancestor that is,
``n00021939`` *artifact, artefact* (in21k index 8). ``policy="drop"`` discards it instead
(top-k probabilities then sum to less than 1), and ``overrides={"n04399382": wnid}``
sends it anywhere you choose. in12k is a subset of in21k (nothing to map);
``index_map(in12k, in21k)`` equals timm's ``imagenet22k_to_12k_indices.txt`` (for each
in12k class, its in21k index).

    >>> unmapped(in1k, in21k)
    ['n04399382']
    >>> int(m[850]), in21k.wnids[m[850]], in21k.lemma(m[850])
    (8, 'n00021939', 'artifact')
    >>> int(index_map(in1k, in21k, policy="drop")[850])
    -1
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from silverlabel.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class SpaceInfo:
    """A registered label space: its wnid list (a file name in timm's ``data/_info``, or an
    absolute path), its size (known without reading the list) and the other names it goes by."""

    name: str
    wnids_file: str
    num_classes: int
    aliases: tuple[str, ...] = ()


#: The one table of label spaces; every list of names (CLI choices, checks) comes from it.
SPACES: dict[str, SpaceInfo] = {}
#: Derived indexes of :data:`SPACES`, kept by :func:`register_label_space`.
SPACE_BY_CLASSES: dict[int, str] = {}
_ALIASES: dict[str, str] = {}


def register_label_space(name: str, wnids_file: str, num_classes: int, aliases: tuple[str, ...] = ()) -> SpaceInfo:
    """Make ``name`` a label space (a new one: its wnid list plus this one line).

    >>> SPACES["in12k"].num_classes, SPACE_BY_CLASSES[21841], _ALIASES["imagenet-1k"]
    (11821, 'in21k', 'in1k')
    """
    info = SpaceInfo(name, wnids_file, num_classes, tuple(aliases))
    SPACES[name] = info
    SPACE_BY_CLASSES.setdefault(num_classes, name)
    for alias in (name, *info.aliases):
        _ALIASES[alias.lower()] = name
    return info


register_label_space("in1k", "imagenet_synsets.txt", 1000, ("imagenet1k", "imagenet-1k", "imagenet", "1k"))
register_label_space("in12k", "imagenet12k_synsets.txt", 11821, ("imagenet12k", "imagenet-12k", "12k"))
register_label_space("in21k", "imagenet22k_synsets.txt", 21841,
                     ("imagenet21k", "imagenet-21k", "in22k", "imagenet22k", "imagenet-22k", "21k", "22k"))
_WNID = re.compile(r"^n\d{8}$")
Policy = Literal["ancestor", "drop", "error"]


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of classes, each a WordNet/ImageNet wnid.

    ``lemma_lines[i]`` is the class's comma-separated lemma list (timm's lemma file);
    empty when unknown, and then the wnid serves as its name.

        >>> s = LabelSpace("toy", ("n02124075", "n02121808"), ("Egyptian cat", "domestic cat, house cat"))
        >>> len(s), s.index("n02121808"), s.names, s.find("house cat")
        (2, 1, ('Egyptian cat', 'domestic cat'), [1])
    """

    name: str
    wnids: tuple[str, ...] = field(repr=False)
    lemma_lines: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wnids", tuple(self.wnids))
        object.__setattr__(self, "lemma_lines", tuple(self.lemma_lines))
        if self.lemma_lines and len(self.lemma_lines) != len(self.wnids):
            raise UserError(f"label space {self.name!r}: {len(self.lemma_lines)} lemma lines "
                             f"for {len(self.wnids)} classes")
        if len(set(self.wnids)) != len(self.wnids):
            raise UserError(f"label space {self.name!r}: duplicate wnids")

    def __hash__(self) -> int:  # cheap; equality still compares every wnid
        return hash((self.name, len(self.wnids), self.wnids[:1], self.wnids[-1:]))

    def __len__(self) -> int:
        return len(self.wnids)

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._index

    @cached_property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}

    @cached_property
    def wnid_set(self) -> frozenset[str]:
        """The wnids as a frozenset (for membership tests)."""
        return frozenset(self.wnids)

    def index(self, wnid: str) -> int:
        """Class index of ``wnid``; ``KeyError`` naming the space when it is not a class.

        >>> get_label_space("in1k").index("n01440764")
        0
        """
        try:
            return self._index[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not a class of label space {self.name!r} ({len(self)} classes)") from None

    def lemmas(self, i: int) -> list[str]:
        """All lemmas of class ``i`` (``[wnid]`` when the space has none).

        >>> get_label_space("in1k").lemmas(850)
        ['teddy', 'teddy bear']
        """
        line = self.lemma_lines[i] if self.lemma_lines else ""
        got = [s.strip() for s in line.split(",") if s.strip()]
        return got or [self.wnids[i]]

    def lemma(self, i: int) -> str:
        """Human name of class ``i``: its first lemma.

        >>> get_label_space("in21k").lemma(0)
        'organism'
        """
        return self.lemmas(i)[0]

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Human names (first lemmas) of all classes, in class order."""
        return tuple(self.lemma(i) for i in range(len(self)))

    @cached_property
    def _lower_lemmas(self) -> list[tuple[str, set[str]]]:
        out = []
        for i in range(len(self)):
            lem = self.lemmas(i)
            out.append((", ".join(lem).lower(), {s.lower() for s in lem}))
        return out

    def find(self, query: str | int) -> list[int]:
        """Class indices matching ``query``: an index number (``285`` or ``"285"``), a wnid,
        or a name - exact lemma matches first (case-insensitive), then classes whose lemma
        list contains ``query`` as a substring. Each group in class order; ``[]`` if none.

        >>> in1k = get_label_space("in1k")
        >>> in1k.find(285), in1k.find("n02124075"), in1k.find("Egyptian Cat"), in1k.find(5000)
        ([285], [285], [285], [])
        >>> in1k.find("crane")  # a bird and a machine
        [134, 517]
        >>> in1k.find("shark")  # substring matches
        [2, 3, 4]
        >>> in21k = get_label_space("in21k")
        >>> [in21k.wnids[i] for i in in21k.find("cat")[:4]]  # exact 'cat' lemmas first
        ['n02121620', 'n02127808', 'n02983507', 'n02985606']
        """
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            i = int(query)
            return [i] if 0 <= i < len(self) else []
        q = str(query).strip()
        if q.isdigit():
            return self.find(int(q))
        if _WNID.match(q):
            return [self._index[q]] if q in self._index else []
        ql = q.lower()
        if not ql:
            return []
        exact, partial = [], []
        for i, (line, lems) in enumerate(self._lower_lemmas):
            if ql in lems:
                exact.append(i)
            elif ql in line:
                partial.append(i)
        return exact + partial


# ---------------------------------------------------------------------------------------
# the built-in spaces, from timm's data/_info


def timm_info_dir() -> Path:
    """timm's ``data/_info`` folder, located without importing timm (which imports torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise ModuleNotFoundError("label spaces in1k/in12k/in21k come from timm's synset lists; "
                                  "timm is not installed: pip install timm")
    if spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"
        if d.is_dir():
            return d
    from importlib import resources  # e.g. a zipped install

    return Path(str(resources.files("timm") / "data" / "_info"))


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [s for s in (line.strip() for line in f) if s]


@lru_cache(maxsize=1)
def _timm_lemmas() -> dict[str, str]:
    out = {}
    with open(timm_info_dir() / "imagenet_synset_to_lemma.txt", encoding="utf-8") as f:
        for line in f:
            wnid, sep, lem = line.rstrip("\n").partition("\t")
            if sep:
                out[wnid] = lem.strip()
    return out


def space_names() -> list[str]:
    """The registered label space names (``--label-space`` choices).

    >>> space_names()
    ['in1k', 'in12k', 'in21k']
    """
    return list(SPACES)


def space_size(name: str) -> int:
    """Number of classes of label space ``name`` (or an alias), without reading its list.

    >>> space_size("imagenet-22k")
    21841
    """
    return SPACES[canonical_space_name(name)].num_classes


def canonical_space_name(name: str) -> str:
    """``"imagenet-22k"`` -> ``"in21k"``; ``ValueError`` for an unknown name.

    >>> canonical_space_name("IN22K")
    'in21k'
    """
    key = str(name).strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    raise UserError(f"unknown label space {name!r} (known: {', '.join(SPACES)})")


@lru_cache(maxsize=None)
def _load_space(name: str) -> LabelSpace:
    info = SPACES[name]
    wnids = _read_lines(timm_info_dir() / info.wnids_file)  # an absolute path stays itself
    if len(wnids) != info.num_classes:
        raise UserError(f"label space {name!r}: {info.wnids_file} lists {len(wnids)} classes, "
                        f"registered with {info.num_classes}")
    lemmas = _timm_lemmas()
    return LabelSpace(name, tuple(wnids), tuple(lemmas.get(w, "") for w in wnids))


def get_label_space(name: str | LabelSpace) -> LabelSpace:
    """The label space ``name`` (``in1k``, ``in12k``, ``in21k``, or an alias such as
    ``imagenet-1k`` / ``in22k``); loaded once, then cached. A ``LabelSpace`` passes through.

    >>> get_label_space("in12k") is get_label_space("imagenet-12k")
    True
    """
    if isinstance(name, LabelSpace):
        return name
    return _load_space(canonical_space_name(name))


# ---------------------------------------------------------------------------------------
# mapping between spaces


class IndexMap(np.ndarray):
    """An int64 array ``m`` with ``m[i]`` = target class of source class ``i`` (-1: dropped),
    carrying ``num_classes`` (the target space's size) so that :func:`map_probs` knows the
    output width. Behaves as a plain ``numpy`` array everywhere else."""

    num_classes: int | None

    def __array_finalize__(self, obj: Any) -> None:
        self.num_classes = getattr(obj, "num_classes", None)


def unmapped(src: LabelSpace | str, dst: LabelSpace | str) -> list[str]:
    """wnids of ``src`` classes that are not classes of ``dst`` (in ``src`` order).

    >>> unmapped("in12k", "in21k")
    []
    """
    src, dst = get_label_space(src), get_label_space(dst)
    return [w for w in src.wnids if w not in dst]


@lru_cache(maxsize=32)
def _index_map(src: LabelSpace, dst: LabelSpace, policy: str, overrides: tuple[tuple[str, str], ...]) -> np.ndarray:
    ov = dict(overrides)
    out = np.full(len(src), -1, dtype=np.int64)
    missing = []
    hier = None
    for i, w in enumerate(src.wnids):
        if w in ov:
            out[i] = dst.index(ov[w])
            continue
        j = dst._index.get(w)
        if j is not None:
            out[i] = j
            continue
        missing.append(w)
        if policy == "ancestor":
            if hier is None:
                from silverlabel.teachers.hierarchy import load_hierarchy

                hier = load_hierarchy()
            if w in hier:
                a = hier.nearest_in(w, dst.wnid_set)
                if a is not None:
                    out[i] = dst._index[a]
    if policy == "error" and missing:
        raise UserError(f"{len(missing)} classes of {src.name!r} are not in {dst.name!r}: {missing[:10]}")
    out.setflags(write=False)
    return out


def index_map(src: LabelSpace | str, dst: LabelSpace | str, policy: Policy = "ancestor",
              overrides: dict[str, str] | None = None) -> IndexMap:
    """For each class of ``src``, its class index in ``dst`` (int64 array of ``len(src)``).

    A class present in ``dst`` maps to itself. A class absent from ``dst``:

    - ``policy="ancestor"`` (default): to its nearest WordNet ancestor that ``dst`` holds
      (hypernyms and instance hypernyms, breadth-first), so its probability mass is kept and
      goes to the more general class - e.g. in1k's teddy bear, absent from fall11, goes to
      in21k's *artifact*. -1 if no ancestor is in ``dst`` (or the wnid is not in WordNet).
    - ``policy="drop"``: -1, i.e. its probability is discarded (top-k probs sum to < 1).
    - ``policy="error"``: ``ValueError`` listing the absent classes.

    ``overrides`` (``{src_wnid: dst_wnid}``) take precedence over both. The result is a
    fresh writable :class:`IndexMap` (a numpy int64 array that knows ``len(dst)``).

    >>> m = index_map("in12k", "in21k")
    >>> m.shape, m.dtype, m.num_classes, bool((m >= 0).all())
    ((11821,), dtype('int64'), 21841, True)
    """
    src, dst = get_label_space(src), get_label_space(dst)
    if policy not in ("ancestor", "drop", "error"):
        raise UserError(f"policy must be 'ancestor', 'drop' or 'error', not {policy!r}")
    ov = tuple(sorted((overrides or {}).items()))
    out = _index_map(src, dst, policy, ov).copy().view(IndexMap)
    out.num_classes = len(dst)
    return out


def map_probs(probs: torch.Tensor | np.ndarray, mapping: Any, num_classes: int | None = None):
    """Scatter-add probabilities ``probs`` (``(N, len(src))`` or ``(len(src),)``) into the target
    space: ``out[:, mapping[i]] += probs[:, i]``; entries with ``mapping[i] == -1`` are dropped.

    Returns the same type as ``probs`` (numpy array, or torch tensor on the same device and
    dtype), shape ``(N, num_classes)``. ``num_classes`` defaults to the target size an
    :func:`index_map` result carries; pass it for a plain array or tensor ``mapping``.
    Several source classes may share one target (their probabilities add up).

    >>> m = index_map("in1k", "in21k", policy="drop")
    >>> p = np.full((2, 1000), 1e-3, dtype=np.float32)
    >>> q = map_probs(p, m)
    >>> q.shape, round(float(q[0].sum()), 4)
    ((2, 21841), 0.999)
    """
    if num_classes is None:
        num_classes = getattr(mapping, "num_classes", None)
        if num_classes is None:
            raise UserError("map_probs: pass num_classes (the target space size) for a plain mapping array")
    if type(probs).__module__.partition(".")[0] == "torch":
        return _map_torch(probs, mapping, int(num_classes))
    return _map_numpy(np.asarray(probs), np.asarray(mapping), int(num_classes))


def _check(shape: tuple[int, ...], n_map: int) -> None:
    if len(shape) not in (1, 2) or shape[-1] != n_map:
        raise UserError(f"map_probs: probs of shape {tuple(shape)} do not match a mapping of {n_map} classes")


def _map_numpy(probs: np.ndarray, mapping: np.ndarray, num_classes: int) -> np.ndarray:
    mapping = mapping.astype(np.int64, copy=False).reshape(-1)
    _check(probs.shape, mapping.shape[0])
    squeeze = probs.ndim == 1
    p = probs[None] if squeeze else probs
    dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float32
    out = np.zeros((p.shape[0], num_classes), dtype=dtype)
    keep = np.flatnonzero(mapping >= 0)
    if keep.size:
        tgt = mapping[keep]
        if tgt.max() >= num_classes:
            raise UserError(f"map_probs: mapping targets class {int(tgt.max())} >= num_classes {num_classes}")
        order = np.argsort(tgt, kind="stable")
        tgt_sorted = tgt[order]
        starts = np.flatnonzero(np.r_[True, tgt_sorted[1:] != tgt_sorted[:-1]])
        gathered = np.take(p, keep[order], axis=1).astype(dtype, copy=False)
        if starts.size == gathered.shape[1]:  # one-to-one: a plain gather
            out[:, tgt_sorted] = gathered
        else:  # many-to-one: sum each run of equal targets
            out[:, tgt_sorted[starts]] = np.add.reduceat(gathered, starts, axis=1)
    return out[0] if squeeze else out


def _map_torch(probs, mapping, num_classes: int):
    import torch

    if isinstance(mapping, np.ndarray):  # decide on the host: no device sync
        mh = np.asarray(mapping, dtype=np.int64).reshape(-1)
        keep_idx = None if (mh >= 0).all() else torch.from_numpy(np.flatnonzero(mh >= 0))
        m = torch.from_numpy(np.ascontiguousarray(mh))
    else:
        m = mapping.reshape(-1).to(torch.int64)
        keep = m >= 0
        keep_idx = None if bool(keep.all()) else keep.nonzero().squeeze(1)
    _check(tuple(probs.shape), m.shape[0])
    m = m.to(probs.device, non_blocking=True)
    squeeze = probs.dim() == 1
    p = probs.unsqueeze(0) if squeeze else probs
    if not p.is_floating_point():
        p = p.float()
    out = p.new_zeros((p.shape[0], num_classes))
    if keep_idx is None:
        out.index_add_(1, m, p)
    else:
        keep_idx = keep_idx.to(probs.device, non_blocking=True)
        out.index_add_(1, m.index_select(0, keep_idx), p.index_select(1, keep_idx))
    return out.squeeze(0) if squeeze else out
