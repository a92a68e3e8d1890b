"""The streaming training loader: counts, order, resume, workers, decoding, targets."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from toy_trainset import write_toy_trainset

from silverlabel.demodata import photo_like_images
from silverlabel.loader import (
    EpochBatches,
    LoaderConfig,
    ShardStream,
    create_loader,
    decode_image,
    normalize_on,
    rank_positions,
    shard_order,
    steps_per_epoch,
)

LENGTHS = [13, 12, 12, 12, 11]
N = sum(LENGTHS)
TOPK = 3


def _write_trainset(root, lengths=LENGTHS, with_labels=True):
    def sample(i, split, width, height):
        meta = {"label": i % 7, "class_name": f"c{i % 7}"}
        if with_labels:
            # sample 0 (first of shard 0) has TOPK labels; others vary (1..TOPK+1)
            m = TOPK if i == 0 else 1 + i % (TOPK + 1)
            meta["labels"] = [(i + j) % 7 for j in range(m)]
            meta["label_probs"] = [round(0.5 / (j + 1), 4) for j in range(m)]
        meta.update(width=width, height=height, source={"key": f"s{i:05d}"})
        return i % 7, meta

    return write_toy_trainset(root, {"train": list(lengths)}, sample, size=(160, 120), seed=5)


@pytest.fixture(scope="module")
def trainset(tmp_path_factory):
    return str(_write_trainset(tmp_path_factory.mktemp("trainset")))


def _cfg(trainset, **kw):
    base = dict(batch_size=4, img_size=32, return_keys=True)
    base.update(kw)
    return LoaderConfig(trainset, **base)


def _keys(cfg, epoch=0, start_step=0):
    """The rank's key sequence, read without decoding images (cheap order checks)."""
    ds = ShardStream(cfg, epoch, start_step)
    from silverlabel.loader import _Stream

    stream = _Stream(cfg, epoch, ds.lengths)
    out = []
    for b in range(start_step, ds.steps):
        for pos in rank_positions(cfg, b, ds.per_rank):
            shard, i = stream.locate(pos)
            out.append(ds._shard_index(shard)[i].key)
    return out


def _run(loader):
    return list(loader)


def test_steps_per_epoch(trainset):
    assert steps_per_epoch(_cfg(trainset, batch_size=4)) == 60 // 4
    assert steps_per_epoch(_cfg(trainset, batch_size=7)) == 60 // 7
    assert steps_per_epoch(_cfg(trainset, batch_size=7, world_size=2)) == 30 // 7
    assert steps_per_epoch(_cfg(trainset, batch_size=7, world_size=7, rank=3)) == 8 // 7
    assert steps_per_epoch(_cfg(trainset, batch_size=7, drop_last=False)) == 9
    loader = create_loader(_cfg(trainset, batch_size=7), epoch=0, start_step=3)
    assert len(loader) == 8 - 3


def test_batch_shapes_dtypes_and_padding(trainset):
    cfg = _cfg(trainset, batch_size=5, img_size=48)
    batches = _run(create_loader(cfg, epoch=0))
    assert len(batches) == 12
    x, cls, labels, probs, keys = batches[0]
    assert x.shape == (5, 3, 48, 48) and x.dtype == torch.float32
    assert cls.shape == (5,) and cls.dtype == torch.int64
    assert labels.shape == (5, TOPK) and labels.dtype == torch.int64
    assert probs.shape == (5, TOPK) and probs.dtype == torch.float32
    assert len(keys) == 5 and all(isinstance(k, str) for k in keys)
    # normalized: roughly zero-centred, well beyond [0, 1]
    assert -3 < float(x.mean()) < 3 and float(x.min()) < 0
    for b in batches:
        _, cls, labels, probs, keys = b
        for j, key in enumerate(keys):
            i = int(key[1:])
            assert int(cls[j]) == i % 7
            m = TOPK if i == 0 else 1 + i % (TOPK + 1)
            want = [(i + t) % 7 for t in range(min(m, TOPK))]
            assert labels[j].tolist() == want + [-1] * (TOPK - len(want))
            p = probs[j].tolist()
            assert p[: len(want)] == pytest.approx([0.5 / (t + 1) for t in range(len(want))], abs=1e-4)
            assert p[len(want):] == [0.0] * (TOPK - len(want))
    # without the flag: 4-tuples
    plain = next(iter(create_loader(dataclasses.replace(cfg, return_keys=False))))
    assert len(plain) == 4


def test_topk_override_and_no_labels(tmp_path):
    root = _write_trainset(tmp_path / "nolabels", lengths=[3, 3], with_labels=False)
    cfg = LoaderConfig(str(root), batch_size=3, img_size=16, return_keys=True)
    x, cls, labels, probs, keys = next(iter(create_loader(cfg)))
    assert labels.shape == (3, 1)
    assert labels[:, 0].tolist() == cls.tolist() and probs[:, 0].tolist() == [1.0] * 3
    cfg5 = dataclasses.replace(cfg, topk=5)
    _, cls, labels, probs, _ = next(iter(create_loader(cfg5)))
    assert labels.shape == (3, 5) and (labels[:, 1:] == -1).all() and (probs[:, 1:] == 0).all()


def test_ranks_slice_the_global_batches(trainset):
    # 2 ranks x 4 = global batch 8: rank r's batch k is the r-th half of the 1-process batch k
    one = _keys(_cfg(trainset, batch_size=8), epoch=1)
    ranks = [_keys(_cfg(trainset, batch_size=4, world_size=2, rank=r), epoch=1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == steps_per_epoch(_cfg(trainset, batch_size=4, world_size=2)) * 4 == 28
    glued = [k for b in range(7) for r in range(2) for k in ranks[r][4 * b: 4 * b + 4]]
    assert glued == one[:56] and len(set(glued)) == 56  # disjoint, and the 1-process order
    assert not set(ranks[0]) & set(ranks[1])


def test_more_ranks_than_shards_and_wraparound(trainset):
    # 7 ranks over 5 shards: every rank still gets 60 // 7 = 8 distinct samples, no warning
    keys = [_keys(_cfg(trainset, batch_size=2, world_size=7, rank=r)) for r in range(7)]
    assert [len(k) for k in keys] == [8] * 7
    assert len({k for ks in keys for k in ks}) == 56
    # without drop_last the epoch is padded to 7 * ceil(60 / 7) = 63 positions: the last 3
    # wrap to the stream's start, and the last global batch (63 - 56 = 7) gives each rank 1
    cfg = _cfg(trainset, batch_size=2, world_size=7, drop_last=False)
    one = _keys(_cfg(trainset, batch_size=14, drop_last=False, world_size=1))
    assert len(one) == 60
    ranks = [_keys(dataclasses.replace(cfg, rank=r)) for r in range(7)]
    assert [len(k) for k in ranks] == [9] * 7
    assert [ranks[r][8] for r in range(7)] == one[56:] + one[:3]


def test_real_loader_ranks_equal_one_process_pixels(trainset, monkeypatch):
    import silverlabel.loader as L

    calls = []
    orig = L.decode_image
    monkeypatch.setattr(L, "decode_image", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    one = _run(create_loader(_cfg(trainset, batch_size=12, img_size=16), epoch=2))
    assert len(calls) == 60
    calls.clear()
    ranks = [_run(create_loader(_cfg(trainset, batch_size=6, world_size=2, rank=r, img_size=16), epoch=2))
             for r in range(2)]
    assert len(calls) == 60  # each rank decodes its own 30 samples, nothing of the other's
    assert [len(b[4]) for b in ranks[0]] == [len(b[4]) for b in ranks[1]] == [6] * 5
    for k, batch in enumerate(one):
        assert batch[4] == ranks[0][k][4] + ranks[1][k][4]
        for j in range(4):  # images (same crops and flips), cls, labels, probs
            assert torch.equal(batch[j], torch.cat([ranks[0][k][j], ranks[1][k][j]]))
    # a rank resumed at batch 3 with workers gives the same tail
    tail = _run(create_loader(_cfg(trainset, batch_size=6, world_size=2, rank=1, img_size=16, num_workers=2),
                              epoch=2, start_step=3))
    assert [b[4] for b in tail] == [b[4] for b in ranks[1][3:]]
    assert torch.equal(tail[0][0], ranks[1][3][0])


def test_epoch_order_deterministic_and_different(trainset):
    cfg = _cfg(trainset)
    e0, e0b, e1 = _keys(cfg, 0), _keys(cfg, 0), _keys(cfg, 1)
    assert e0 == e0b
    assert e0 != e1
    assert sorted(e0) == sorted(e1)  # world_size 1, 60 % 4 == 0: a permutation of all samples
    assert len(set(e0)) == N
    assert _keys(dataclasses.replace(cfg, seed=1), 0) != e0
    # shards really are shuffled between epochs (and samples within them)
    orders = {tuple(shard_order(cfg, e, 5)) for e in range(6)}
    assert len(orders) > 1


def test_resume_is_the_exact_tail(trainset):
    cfg = _cfg(trainset, batch_size=4, img_size=24)
    full = _run(create_loader(cfg, epoch=2))
    k = 6
    tail = _run(create_loader(cfg, epoch=2, start_step=k))
    assert len(tail) == len(full) - k
    for a, b in zip(full[k:], tail):
        assert a[4] == b[4]
        for ta, tb in zip(a[:4], b[:4]):
            assert torch.equal(ta, tb)


def test_resume_skips_without_decoding(trainset, monkeypatch):
    import silverlabel.loader as L

    calls = []
    orig = L.decode_image
    monkeypatch.setattr(L, "decode_image", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    cfg = _cfg(trainset, batch_size=4, img_size=16)
    batches = _run(create_loader(cfg, epoch=0, start_step=13))
    assert len(batches) == 2 and len(calls) == 8


def test_workers_give_the_same_batches(trainset):
    cfg = _cfg(trainset, batch_size=7, img_size=24, drop_last=False)
    single = _run(create_loader(cfg, epoch=3))
    multi = _run(create_loader(dataclasses.replace(cfg, num_workers=2), epoch=3))
    assert [b[4] for b in single] == [b[4] for b in multi]
    assert [len(b[4]) for b in single] == [7] * 8 + [4]
    for a, b in zip(single, multi):
        for ta, tb in zip(a[:4], b[:4]):
            assert torch.equal(ta, tb)
    # and resume works with workers too (odd start)
    resumed = _run(create_loader(dataclasses.replace(cfg, num_workers=2), epoch=3, start_step=5))
    assert [b[4] for b in resumed] == [b[4] for b in single[5:]]
    assert torch.equal(resumed[0][0], single[5][0])


@pytest.mark.parametrize("train", [True, False])
def test_uint8_batches_normalized_on_device_equal_cpu_path(trainset, train):
    cfg = _cfg(trainset, batch_size=8, img_size=24, train=train, drop_last=False)
    a = _run(create_loader(cfg, epoch=1))
    ucfg = dataclasses.replace(cfg, normalize=False)
    b = _run(create_loader(ucfg, epoch=1))
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert bb[0].dtype == torch.uint8 and ba[0].dtype == torch.float32
        assert torch.equal(normalize_on(bb[0], ucfg), ba[0])  # same arithmetic, same bits
        assert normalize_on(ba[0], cfg) is ba[0]  # float batches pass through
        for ta, tb in zip(ba[1:4], bb[1:4]):
            assert torch.equal(ta, tb)


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_batches_equal_a_loader_per_epoch(trainset, workers):
    # 60 samples / 7 = 8 batches per epoch; a trainer taking 6 per epoch (accumulation tail
    # skipped), starting at batch 4 of epoch 2, for 13 batches: 2 + 6 + 5 across three epochs
    cfg = _cfg(trainset, batch_size=7, img_size=16, num_workers=workers)
    want = (_run(create_loader(cfg, 2, 4))[:2] + _run(create_loader(cfg, 3))[:6] + _run(create_loader(cfg, 4))[:5])
    got = list(EpochBatches(cfg, 2, 4, batches_per_epoch=6, limit=13, lookahead=3))
    assert [b[4] for b in got] == [b[4] for b in want]
    for a, b in zip(got, want):
        assert torch.equal(a[0], b[0])
    # no limit: an endless stream of whole epochs
    it = iter(EpochBatches(cfg, 0))
    assert [next(it)[4] for _ in range(16)] == [b[4] for b in _run(create_loader(cfg, 0)) + _run(create_loader(cfg, 1))]
    with pytest.raises(ValueError, match="start_step"):
        EpochBatches(cfg, 0, 6, batches_per_epoch=6)


def test_augmentation_varies_but_eval_is_deterministic(trainset):
    cfg = _cfg(trainset, batch_size=6, img_size=32)
    a = next(iter(create_loader(cfg, epoch=0)))
    b = next(iter(create_loader(cfg, epoch=0)))
    assert torch.equal(a[0], b[0])
    ev = dataclasses.replace(cfg, train=False, draft=False)  # exact reference below
    e1 = _run(create_loader(ev, epoch=0))
    e2 = _run(create_loader(ev, epoch=5))
    # eval: file order, no shuffle, no augmentation (epoch does not matter)
    assert [k for b in e1 for k in b[4]] == [f"s{i:05d}" for i in range(N)]
    for x, y in zip(e1, e2):
        assert torch.equal(x[0], y[0])
    # eval pixels are the center crop of the resized image
    from silverlabel.loader import to_tensor

    raw = list(photo_like_images(1, size=(160, 120), seed=5))[0][1]
    im = Image.open(io.BytesIO(raw)).convert("RGB")
    short = int(32 / 0.875)
    w, h = im.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    l, t = int(round((nw - 32) / 2)), int(round((nh - 32) / 2))
    want = to_tensor(im.crop((l, t, l + 32, t + 32)), torch.tensor(cfg.mean).view(3, 1, 1),
                     torch.tensor(cfg.std).view(3, 1, 1))
    assert torch.equal(e1[0][0][0], want)
    # train crops differ from the eval center crop and between epochs
    t0 = next(iter(create_loader(cfg, epoch=0)))
    t1 = next(iter(create_loader(cfg, epoch=1)))
    assert not torch.equal(t0[0], t1[0])


def test_draft_decoding_close_to_full_decode():
    raw = list(photo_like_images(1, size=(640, 480), seed=2))[0][1]
    for train in (False, True):
        cfg = LoaderConfig("unused", img_size=64, train=train, scale=(0.5, 1.0))
        fast = decode_image(raw, cfg, np.random.default_rng(0) if train else None)
        slow = decode_image(raw, dataclasses.replace(cfg, draft=False), np.random.default_rng(0) if train else None)
        assert fast.size == slow.size == (64, 64)
        diff = np.abs(np.asarray(fast, dtype=np.int16) - np.asarray(slow, dtype=np.int16))
        assert diff.mean() < 6, diff.mean()
    # draft actually reduces the decoded size when the target is much smaller
    im = Image.open(io.BytesIO(raw))
    im.draft("RGB", (160, 120))
    assert im.size[0] < 640


def test_info_without_shard_lengths_is_a_clear_error(tmp_path):
    # the loader's order, eval's count, reinforce and verify all need each file's samples: never assumed 0
    from silverlabel.dataset import TrainSet

    root = _write_trainset(tmp_path / "nolengths", lengths=[3, 2])
    info = json.loads((root / "_info.json").read_text())
    del info["splits"]["train"]["shard_lengths"]
    (root / "_info.json").write_text(json.dumps(info))
    message = r"_info\.json: split 'train' has no 'shard_lengths' \(the samples in each file"
    with pytest.raises(ValueError, match=message):
        steps_per_epoch(LoaderConfig(str(root), batch_size=1, img_size=8))
    with pytest.raises(ValueError, match=message):
        _run(create_loader(LoaderConfig(str(root), batch_size=1, img_size=8, train=False)))
    with pytest.raises(ValueError, match=message):
        TrainSet(root).read_info()


def test_bad_split_and_mismatched_lengths(trainset, tmp_path):
    with pytest.raises(ValueError, match="no split"):
        ShardStream(_cfg(trainset, split="validation"))
    root = _write_trainset(tmp_path / "bad", lengths=[3, 2])
    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [2, 3]
    (root / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="holds 3 samples"):
        _run(create_loader(LoaderConfig(str(root), batch_size=1, img_size=8, train=False)))
