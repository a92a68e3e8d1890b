"""Label spaces (in1k/in12k/in21k), mapping between them, and the WordNet hierarchy."""

from __future__ import annotations

import doctest
import gzip
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from silverlabel.teachers import hierarchy as hierarchy_mod
from silverlabel.teachers import labelspace as labelspace_mod
from silverlabel.teachers.hierarchy import load_hierarchy
from silverlabel.teachers.labelspace import (
    LabelSpace,
    get_label_space,
    index_map,
    map_probs,
    timm_info_dir,
    unmapped,
)

TEDDY, ARTIFACT, EGYPTIAN_CAT, ENTITY = "n04399382", "n00021939", "n02124075", "n00001740"


@pytest.fixture(scope="module")
def spaces():
    return get_label_space("in1k"), get_label_space("in12k"), get_label_space("in21k")


def test_sizes_and_order(spaces):
    in1k, in12k, in21k = spaces
    assert (len(in1k), len(in12k), len(in21k)) == (1000, 11821, 21841)
    assert list(in21k.wnids) == sorted(set(in21k.wnids))
    assert list(in12k.wnids) == sorted(set(in12k.wnids))
    assert in1k.wnids[0] == "n01440764" and in1k.lemma(0) == "tench"
    assert in1k.wnids[999] == "n15075141" and in1k.wnids[285] == EGYPTIAN_CAT
    assert in1k.lemma(285) == "Egyptian cat" and in1k.names[285] == "Egyptian cat"
    assert get_label_space("imagenet-22k") is in21k and get_label_space(in1k) is in1k
    with pytest.raises(ValueError, match="unknown label space"):
        get_label_space("in5k")


def test_index_errors(spaces):
    in1k = spaces[0]
    assert in1k.index(EGYPTIAN_CAT) == 285 and EGYPTIAN_CAT in in1k
    with pytest.raises(KeyError, match="not a class of label space 'in1k'"):
        in1k.index("n00001740")


def test_find(spaces):
    in1k, _, in21k = spaces
    for q in ("egyptian cat", "Egyptian Cat", "n02124075", "285", 285, np.int64(285)):
        assert in1k.find(q) == [285], q
    assert in1k.find("1000") == [] and in1k.find("n00000000") == [] and in1k.find("zzqx") == []
    assert in1k.find("crane") == [134, 517]  # the bird and the machine share a lemma
    cat = in21k.find("cat")
    assert cat[0] == in21k.index("n02121620") and len(cat) > 100  # exact lemma first, then substrings


def test_round_trips(spaces):
    in1k, in12k, in21k = spaces
    m = index_map(in1k, in21k)
    assert m.dtype == np.int64 and m.shape == (1000,) and m.num_classes == 21841
    for i, w in enumerate(in1k.wnids):
        if w in in21k:
            assert in21k.wnids[m[i]] == w
    m12 = index_map(in12k, in21k)
    assert [in21k.wnids[j] for j in m12] == list(in12k.wnids)
    assert unmapped(in12k, in21k) == []
    # timm's imagenet22k_to_12k_indices.txt: line j = in21k index of in12k class j
    timm_idx = np.loadtxt(timm_info_dir() / "imagenet22k_to_12k_indices.txt", dtype=np.int64)
    np.testing.assert_array_equal(m12, timm_idx)
    # and back: in21k -> in12k is the identity on the 12k classes
    back = index_map(in21k, in12k)
    np.testing.assert_array_equal(back[m12], np.arange(len(in12k)))


def test_absent_in1k_class(spaces):
    in1k, _, in21k = spaces
    assert unmapped(in1k, in21k) == [TEDDY]
    assert in1k.index(TEDDY) == 850
    h = load_hierarchy()
    assert h.parents(TEDDY) == ["n03964744"] and "n03964744" not in in21k  # plaything isn't fall11 either
    assert index_map(in1k, in21k)[850] == in21k.index(ARTIFACT)
    assert index_map(in1k, in21k, policy="drop")[850] == -1
    assert (index_map(in1k, in21k, policy="drop") >= 0).sum() == 999
    assert index_map(in1k, in21k, overrides={TEDDY: "n03219135"})[850] == in21k.index("n03219135")  # doll
    with pytest.raises(ValueError, match="n04399382"):
        index_map(in1k, in21k, policy="error")
    with pytest.raises(ValueError, match="policy"):
        index_map(in1k, in21k, policy="nearest")
    m = index_map(in1k, in21k)
    m[0] = 5  # a fresh copy every time: the cache is not affected
    assert index_map(in1k, in21k)[0] == in21k.index(in1k.wnids[0])


def _probs(n, c, seed=0):
    p = np.random.default_rng(seed).random((n, c), dtype=np.float32)
    return p / p.sum(1, keepdims=True)


def test_map_probs_mass(spaces):
    in1k, _, in21k = spaces
    p = _probs(8, 1000)
    q = map_probs(p, index_map(in1k, in21k))
    assert q.shape == (8, 21841) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)
    assert q[:, in21k.index(ARTIFACT)] == pytest.approx(p[:, 850])
    assert q[:, in21k.index(EGYPTIAN_CAT)] == pytest.approx(p[:, 285])
    qd = map_probs(p, index_map(in1k, in21k, policy="drop"))
    np.testing.assert_allclose(qd.sum(1), 1.0 - p[:, 850], atol=1e-5)
    assert (qd[:, in21k.index(ARTIFACT)] == 0).all()
    # many-to-one: in21k -> in1k with ancestors; mass kept for the classes that map somewhere
    m = index_map(in21k, in1k)
    p21 = _probs(3, 21841, seed=1)
    q1 = map_probs(p21, m)
    np.testing.assert_allclose(q1.sum(1), p21[:, m >= 0].sum(1), rtol=1e-5)
    np.testing.assert_allclose(q1[0], np.bincount(m[m >= 0], p21[0, m >= 0], minlength=1000), rtol=1e-5)
    # a single vector, and a plain mapping needs num_classes
    np.testing.assert_allclose(map_probs(p[0], index_map(in1k, in21k)), q[0])
    with pytest.raises(ValueError, match="num_classes"):
        map_probs(p, np.asarray(index_map(in1k, in21k)))
    np.testing.assert_allclose(map_probs(p, np.asarray(index_map(in1k, in21k)), num_classes=21841), q)


def test_map_probs_torch_matches_numpy(spaces):
    torch = pytest.importorskip("torch")
    in1k, in12k, in21k = spaces
    for src, dst, policy in ((in1k, in21k, "ancestor"), (in1k, in21k, "drop"), (in21k, in12k, "ancestor")):
        m = index_map(src, dst, policy=policy)
        p = _probs(4, len(src), seed=2)
        qn = map_probs(p, m)
        qt = map_probs(torch.from_numpy(p), m)
        assert isinstance(qt, torch.Tensor) and qt.dtype == torch.float32 and tuple(qt.shape) == (4, len(dst))
        np.testing.assert_allclose(qt.numpy(), qn, atol=1e-6)
        qt2 = map_probs(torch.from_numpy(p), torch.as_tensor(np.asarray(m)), num_classes=len(dst))
        np.testing.assert_allclose(qt2.numpy(), qn, atol=1e-6)


def test_hierarchy():
    h = load_hierarchy()
    anc = h.ancestors(EGYPTIAN_CAT)
    assert anc[0] == "n02121808" and anc[-1] == ENTITY  # domestic cat ... entity
    assert {"n02120997", "n02075296", "n01861778"} <= set(anc)  # feline, carnivore, mammal
    assert len(anc) == len(set(anc)) and EGYPTIAN_CAT not in anc
    assert h.lemma(EGYPTIAN_CAT) == "Egyptian cat" and h.lemmas(TEDDY) == ["teddy", "teddy bear"]
    assert h.gloss(EGYPTIAN_CAT) == "a domestic cat of Egypt"
    assert h.depth(ENTITY) == 0 and h.depth(EGYPTIAN_CAT) == 9
    assert all(h.depth(p) >= h.depth(EGYPTIAN_CAT) - 1 for p in h.parents(EGYPTIAN_CAT))
    path = h.path_to_root(EGYPTIAN_CAT)
    assert [h.depth(w) for w in path] == list(range(9, -1, -1))
    assert h.ancestor_at_depth(EGYPTIAN_CAT, 0) == ENTITY
    assert h.ancestor_at_depth(EGYPTIAN_CAT, 6) == "n00015388"  # animal
    assert h.ancestor_at_depth(EGYPTIAN_CAT, 9) == EGYPTIAN_CAT == h.ancestor_at_depth(EGYPTIAN_CAT, 50)
    assert h.nearest_in(EGYPTIAN_CAT, {"n02120997", ENTITY}) == "n02120997"
    assert h.nearest_in(TEDDY, get_label_space("in21k").wnid_set) == ARTIFACT
    assert h.nearest_in(EGYPTIAN_CAT, []) is None
    assert h.is_a(EGYPTIAN_CAT, "n02120997") and not h.is_a("n02120997", EGYPTIAN_CAT)
    with pytest.raises(KeyError, match="not in the WordNet hierarchy"):
        h.parents("n99999999")
    # every label-space synset is in WordNet 3.0 and reaches the root
    in21k = get_label_space("in21k")
    assert not h.not_in_wordnet
    assert all(h.depth(w) > 0 for w in in21k.wnids)
    assert h.in_space(TEDDY, "in1k") and not h.in_space(TEDDY, "in21k")


def test_hierarchy_file():
    f = resources.files("silverlabel.teachers").joinpath("data").joinpath("wordnet_hierarchy.json.gz")
    data = f.read_bytes()
    assert len(data) < 1_500_000
    doc = json.loads(gzip.decompress(data))
    assert doc["format"] == "silverlabel-wordnet-hierarchy-v1" and doc["root"] == ENTITY
    cols = doc["columns"]
    assert len({len(v) for v in cols.values()}) == 1 and cols["wnid"] == sorted(cols["wnid"])


def test_doctests():
    for mod in (hierarchy_mod, labelspace_mod):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0, mod.__name__


def test_custom_label_space():
    s = LabelSpace("mine", ("n02124075", "n02084071"))
    assert s.lemma(1) == "n02084071" and s.find("n02084071") == [1]
    m = index_map(s, "in1k")  # Egyptian cat -> 285; dog has no in1k ancestor
    assert list(m) == [285, -1]
    with pytest.raises(ValueError, match="duplicate"):
        LabelSpace("dup", ("n02124075", "n02124075"))


DATA_NOUN = Path("/usr/share/wordnet/data.noun")


@pytest.mark.skipif(not (DATA_NOUN.exists() and os.environ.get("SILVERLABEL_SLOW")),
                    reason="needs wordnet-base and SILVERLABEL_SLOW=1")
def test_build_script_reproduces_shipped_file(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "h.json.gz"
    subprocess.run([sys.executable, str(root / "scripts/build_wordnet_hierarchy.py"), "-o", str(out)],
                   check=True, capture_output=True)
    shipped = resources.files("silverlabel.teachers").joinpath("data").joinpath("wordnet_hierarchy.json.gz")
    assert out.read_bytes() == shipped.read_bytes()
