"""Contract tests: every registered loss, label space, source, teacher and engine passes the
same test. A new one that does not is caught here, before a stage uses it."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from silverlabel.engine import create_engine, engine_names
from silverlabel.errors import UserError
from silverlabel.losses import TARGETS, get_loss, loss_names
from silverlabel.sources import SourceOptions, kind_of, open_source, source_kinds
from silverlabel.teachers import available_teachers
from silverlabel.teachers.labelspace import SPACE_BY_CLASSES, SPACES, canonical_space_name, get_label_space, space_names


def _jpeg(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("name", loss_names())
def test_loss_contract(name):
    import torch

    from silverlabel.losses import Batch
    from silverlabel.stages.train import TrainConfig

    loss = get_loss(name)
    assert loss.name == name and loss.targets in TARGETS and loss.help
    cfg = TrainConfig("x", "y", loss=name)
    n = 6
    cls = torch.tensor([2, 4, -1])
    labels = torch.tensor([[2, 5, -1], [4, -1, -1], [1, 3, 0]])
    probs = torch.tensor([[0.7, 0.2, 0.0], [0.9, 0.0, 0.0], [0.5, 0.3, 0.1]])
    batch = Batch(cls, labels, probs)
    target = (cls if loss.targets == "class" else labels[:, 0]).clamp(min=0)
    logits = torch.zeros(3, n, requires_grad=True)
    value = loss(logits, batch, cfg)
    assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    right = torch.nn.functional.one_hot(target, n).float() * 2
    assert float(loss(right, batch, cfg)) < float(value.detach())  # leaning to the target beats uniform
    assert float(loss(right.half(), batch, cfg)) == pytest.approx(float(loss(right, batch, cfg)), rel=1e-2)
    with pytest.raises(UserError):  # an index beyond the head is named, not an index error
        loss(torch.zeros(3, 2), batch, cfg)


def test_unknown_loss_is_a_user_error():
    from silverlabel.stages.train import TrainConfig

    with pytest.raises(UserError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(UserError, match="loss must be one of ce, bce-multihot, soft-topk, kd"):
        TrainConfig("x", "y", loss="nope")


# ---------------------------------------------------------------------------------------
# label spaces


@pytest.mark.parametrize("name", space_names())
def test_label_space_contract(name):
    info = SPACES[name]
    space = get_label_space(name)
    assert space.name == name and len(space) == info.num_classes
    assert all(re.fullmatch(r"n\d{8}", w) for w in space.wnids)
    assert space.lemma(0) and len(space.names) == len(space)
    for alias in (name, *info.aliases):
        assert canonical_space_name(alias) == name and canonical_space_name(alias.upper()) == name
    assert SPACE_BY_CLASSES[info.num_classes] == name
    from silverlabel.teachers.labelspace import index_map

    m = index_map(name, "in21k")  # every space maps into the default output space
    assert m.num_classes == len(get_label_space("in21k")) and (m >= 0).all()


def test_unknown_label_space_names_the_known_ones():
    with pytest.raises(UserError, match="known: in1k, in12k, in21k"):
        get_label_space("in5k")


# ---------------------------------------------------------------------------------------
# sources: an example input per kind; a new kind needs one here


def _table(root):
    path = root / "urls.csv"
    path.write_text("url,caption\nhttp://example.invalid/a.jpg,a\nhttp://example.invalid/b.jpg,b\n")
    return path, 2


def _folder(root):
    for cls in ("cat", "dog"):
        (root / "imgs" / cls).mkdir(parents=True)
        (root / "imgs" / cls / "1.jpg").write_bytes(_jpeg())
    return root / "imgs", 2


def _tar(root):
    from silverlabel.formats.wds import ShardWriter

    path = root / "data-000000.tar"
    with open(path, "wb") as f, ShardWriter(f) as w:
        for i in range(3):
            w.write(f"s{i:03d}", {"jpg": _jpeg(), "txt": b"caption"})
    return path, 3


def _img2dataset(root):
    """img2dataset's ``parquet`` output format: metadata columns and the image bytes embedded
    (made here; tests/test_img2dataset_sources.py runs img2dataset itself)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / "i2d"
    out.mkdir()
    rows = [{"url": f"http://example.invalid/{i}.jpg", "caption": f"c{i}", "key": f"0000{i:04d}", "status": "success",
             "error_message": None, "width": 8, "height": 8, "original_width": 8, "original_height": 8,
             "jpg": _jpeg()} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), out / "00000.parquet")
    return out, 3


EXAMPLES = {"table": _table, "folder": _folder, "tar": _tar, "img2dataset": _img2dataset}


@pytest.mark.parametrize("kind", source_kinds())
def test_source_contract(kind, tmp_path):
    if kind not in EXAMPLES:
        pytest.fail(f"source kind {kind!r} has no example input in tests/test_registries.py EXAMPLES")
    path, n = EXAMPLES[kind](tmp_path)
    assert kind_of(str(path)) == kind
    src = open_source(str(path), SourceOptions())
    assert src.describe()["kind"] == kind
    items = list(src.items())
    assert [i.index for i in items] == list(range(n))
    assert all(i.kind in ("url", "file", "tar", "embedded") and (i.url or i.path) for i in items)
    assert all(isinstance(f.name, str) for f in src.extra_fields)
    forced = open_source(str(path), SourceOptions(kind=kind))  # --source-kind names it
    assert len(list(forced.items())) == n


def test_unknown_source_kind():
    with pytest.raises(UserError, match="unknown source kind 'zip'"):
        open_source("x", SourceOptions(kind="zip"))


# ---------------------------------------------------------------------------------------
# teachers (the built-in ones; timm:NAME is tested in test_label.py)


@pytest.mark.parametrize("name", [t for t in available_teachers() if ":" not in t])
def test_teacher_contract(name):
    import torch

    from silverlabel.teachers import TeacherSpec, create_teacher

    t = create_teacher(TeacherSpec(name))
    assert t.label_space in space_names() and t.activation in ("softmax", "sigmoid")
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation"):
        assert key in t.data_config, key
    c, h, w = t.data_config["input_size"]
    with torch.no_grad():
        out = t.model(torch.zeros(1, c, h, w))
    assert out.shape == (1, SPACES[t.label_space].num_classes)
    assert t.describe()["name"] == t.name


# ---------------------------------------------------------------------------------------
# engines


@pytest.mark.parametrize("name", engine_names())
def test_engine_contract(name):
    if name != "local":
        pytest.importorskip(name)
        pytest.skip(f"{name}: covered by tests/test_engine_{name}.py (starts a cluster)")
    from silverlabel.engine import _square

    for workers in (1, 2):  # in-process, and a pool of processes
        assert sorted(create_engine(name, workers=workers).map(_square, [1, 2, 3], None)) == [1, 4, 9]


def test_unknown_engine():
    with pytest.raises(UserError, match="unknown engine 'spark' \\(available: local, ray\\)"):
        create_engine("spark")
