"""The WordNet 3.0 noun hierarchy over silverlabel's label spaces (in1k, in12k, in21k).

The data is ``teachers/data/wordnet_hierarchy.json.gz``, generated from Debian's
``wordnet-base`` by ``scripts/build_wordnet_hierarchy.py``: every synset of the three
label spaces plus all their ancestors (hypernyms and instance hypernyms), with lemmas,
direct parents, depth and gloss. A synset is named by its ImageNet wnid (``"n"`` + the
8-digit WordNet 3.0 noun offset).

**Depth** is the length of the *shortest* hypernym path to the root ``n00001740``
(entity, depth 0); :meth:`Hierarchy.ancestor_at_depth` rolls a class up along that path.

    >>> h = load_hierarchy()
    >>> h.lemma("n02124075"), h.parents("n02124075")
    ('Egyptian cat', ['n02121808'])
    >>> h.ancestors("n02124075")[:4]
    ['n02121808', 'n02121620', 'n01317541', 'n02120997']
    >>> [h.lemma(w) for w in h.ancestors("n02124075")[:4]]
    ['domestic cat', 'cat', 'domestic animal', 'feline']
    >>> h.depth("n00001740"), h.depth("n02124075")
    (0, 9)
    >>> [h.lemma(w) for w in h.path_to_root("n02124075")][:4]
    ['Egyptian cat', 'domestic cat', 'domestic animal', 'animal']
    >>> h.lemma(h.ancestor_at_depth("n02124075", 6))
    'animal'

Mind what "shortest" means in WordNet: domestic cat has two parents, cat (the
taxonomic chain cat < feline < carnivore < placental < mammal < ..., depth 13 for cat)
and domestic animal (depth 7), so its shortest route - and hence its depth (8) and its
roll-up - goes through domestic animal. This is the convention of e.g. YOLO9000's
WordTree; :meth:`Hierarchy.ancestors` and :meth:`Hierarchy.nearest_in` still see every
route (breadth-first).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

from silverlabel.errors import UserError

FORMAT = "silverlabel-wordnet-hierarchy-v1"
ROOT = "n00001740"  # entity.n.01
DATA_FILE = "wordnet_hierarchy.json.gz"


class Hierarchy:
    """Read-only WordNet noun hierarchy, addressed by wnid (``"n02124075"``).

    Every method raises ``KeyError`` for a wnid the hierarchy does not hold.
    """

    def __init__(self, doc: dict):
        if doc.get("format") != FORMAT:
            raise UserError(f"not a {FORMAT} document (format={doc.get('format')!r})")
        cols = doc["columns"]
        self._wnids: list[str] = cols["wnid"]
        self._row: dict[str, int] = {w: i for i, w in enumerate(self._wnids)}
        self._lemmas: list[list[str]] = cols["lemmas"]
        self._parents: list[list[int]] = cols["parents"]
        self._depth: list[int] = cols["depth"]
        self._member: list[int] = cols.get("member", [0] * len(self._wnids))
        self._gloss: list[str] = cols.get("gloss", [""] * len(self._wnids))
        self.root: str = doc.get("root", ROOT)
        self.source: dict = doc.get("source", {})
        self.member_bits: dict[str, int] = doc.get("member_bits", {})
        #: wnids of label-space synsets that WordNet 3.0 lacks (kept with timm's lemma, no parents)
        self.not_in_wordnet: frozenset[str] = frozenset(doc.get("not_in_wordnet", ()))
        self._anc_cache: dict[int, tuple[int, ...]] = {}

    # -- basics ----------------------------------------------------------------------
    def _r(self, wnid: str) -> int:
        try:
            return self._row[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not in the WordNet hierarchy "
                           f"(it holds the in1k/in12k/in21k synsets and their ancestors)") from None

    def __len__(self) -> int:
        return len(self._wnids)

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._row

    @property
    def wnids(self) -> list[str]:
        """All wnids held, sorted."""
        return list(self._wnids)

    def parents(self, wnid: str) -> list[str]:
        """Direct hypernyms then instance hypernyms, in WordNet's order.

        >>> load_hierarchy().parents("n00001740")
        []
        """
        return [self._wnids[p] for p in self._parents[self._r(wnid)]]

    def lemmas(self, wnid: str) -> list[str]:
        """All WordNet words of the synset, underscores as spaces.

        >>> load_hierarchy().lemmas("n04399382")
        ['teddy', 'teddy bear']
        """
        return list(self._lemmas[self._r(wnid)])

    def lemma(self, wnid: str) -> str:
        """The first lemma (WordNet's head word).

        >>> load_hierarchy().lemma("n02121808")
        'domestic cat'
        """
        lem = self._lemmas[self._r(wnid)]
        return lem[0] if lem else wnid

    def gloss(self, wnid: str) -> str:
        """WordNet's definition (example sentences dropped); ``""`` when not shipped.

        >>> load_hierarchy().gloss("n02124075")
        'a domestic cat of Egypt'
        """
        return self._gloss[self._r(wnid)]

    def depth(self, wnid: str) -> int:
        """Shortest hypernym-path length to the root ``n00001740`` (entity = 0; -1 if unrooted).

        >>> load_hierarchy().depth("n02121808")
        8
        """
        return self._depth[self._r(wnid)]

    def in_space(self, wnid: str, space: str) -> bool:
        """Whether ``wnid`` is a class of label space ``space`` (``in1k``, ``in12k``, ``in21k``).

        >>> h = load_hierarchy()
        >>> h.in_space("n04399382", "in1k"), h.in_space("n04399382", "in21k")
        (True, False)
        """
        return bool(self._member[self._r(wnid)] & self.member_bits[space])

    # -- graph walks -----------------------------------------------------------------
    def _ancestor_rows(self, r: int) -> tuple[int, ...]:
        got = self._anc_cache.get(r)
        if got is None:
            seen = {r}
            order: list[int] = []
            frontier = [r]
            while frontier:
                nxt = []
                for x in frontier:
                    for p in self._parents[x]:
                        if p not in seen:
                            seen.add(p)
                            order.append(p)
                            nxt.append(p)
                frontier = nxt
            got = self._anc_cache[r] = tuple(order)
        return got

    def ancestors(self, wnid: str) -> list[str]:
        """All ancestors, nearest first (breadth-first over parents, deduplicated, self excluded).

        >>> h = load_hierarchy()
        >>> anc = h.ancestors("n02124075")
        >>> anc[0], anc[-1], "n02120997" in anc
        ('n02121808', 'n00001740', True)
        """
        return [self._wnids[a] for a in self._ancestor_rows(self._r(wnid))]

    def is_a(self, wnid: str, ancestor: str) -> bool:
        """Whether ``ancestor`` is ``wnid`` itself or one of its ancestors.

        >>> load_hierarchy().is_a("n02124075", "n02120997")  # Egyptian cat is a feline
        True
        """
        r, a = self._r(wnid), self._r(ancestor)
        return r == a or a in self._ancestor_rows(r)

    def path_to_root(self, wnid: str) -> list[str]:
        """The shortest path from ``wnid`` (first) up to the root (last).

        At a synset with several parents, the first parent (WordNet order) of the
        smallest depth is followed.

        >>> [load_hierarchy().lemma(w) for w in load_hierarchy().path_to_root("n02084071")][:3]
        ['dog', 'domestic animal', 'animal']
        """
        r = self._r(wnid)
        path = [r]
        while self._depth[r] > 0:
            d = self._depth[r]
            r = next(p for p in self._parents[r] if self._depth[p] == d - 1)
            path.append(r)
        return [self._wnids[x] for x in path]

    def ancestor_at_depth(self, wnid: str, d: int) -> str:
        """Roll-up: the ancestor at depth ``d`` on the shortest path to the root.

        The synset itself when its depth is <= ``d`` (or it is not connected to the root).

        >>> h = load_hierarchy()
        >>> h.lemma(h.ancestor_at_depth("n02124075", 8)), h.ancestor_at_depth("n02124075", 0)
        ('domestic cat', 'n00001740')
        >>> h.ancestor_at_depth("n02124075", 99)
        'n02124075'
        """
        if d < 0:
            raise UserError(f"depth must be >= 0, got {d}")
        path = self.path_to_root(wnid)
        depth = self._depth[self._r(wnid)]
        return wnid if depth <= d else path[depth - d]

    def nearest_in(self, wnid: str, wnid_set: Iterable[str]) -> str | None:
        """The synset itself if it is in ``wnid_set``, else its nearest ancestor that is.

        "Nearest" is breadth-first order over parents (fewest hypernym steps; ties go
        to the earlier parent in WordNet's order). ``None`` when no ancestor is in the set.
        Used to map a class that a target label space lacks onto its hypernym there.

        >>> h = load_hierarchy()
        >>> h.nearest_in("n02124075", {"n02120997", "n00001740"})  # Egyptian cat -> feline
        'n02120997'
        >>> h.nearest_in("n02124075", {"n02124075"}), h.nearest_in("n02124075", set())
        ('n02124075', None)
        """
        s = wnid_set if isinstance(wnid_set, (set, frozenset, dict)) else set(wnid_set)
        if wnid in s:
            self._r(wnid)  # still a KeyError for unknown wnids
            return wnid
        for a in self._ancestor_rows(self._r(wnid)):
            if self._wnids[a] in s:
                return self._wnids[a]
        return None


@lru_cache(maxsize=1)
def load_hierarchy() -> Hierarchy:
    """The shipped hierarchy (read once, cached).

    >>> len(load_hierarchy()) > 21841
    True
    """
    data = resources.files("silverlabel.teachers").joinpath("data").joinpath(DATA_FILE).read_bytes()
    return Hierarchy(json.loads(gzip.decompress(data)))
