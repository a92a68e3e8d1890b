"""The GPU label path agrees with the CPU path (runs only where CUDA is visible)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from silverlabel.demodata import photo_like_images
from silverlabel.stages.ingest import IngestConfig, run_ingest
from silverlabel.stages.label import LabelConfig, get_labeler, run_label

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    folder = root / "photos"
    folder.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(folder / "a.jpg", quality=95)
    Image.fromarray(skimage.data.coffee()).save(folder / "b.jpg", quality=90, progressive=True)  # kept as is
    for name, data in photo_like_images(60, size=(640, 480), seed=2):
        (folder / name).write_bytes(data)
    (folder / "z.png").write_bytes(b"\x89PNG broken")
    run_ingest(IngestConfig(sources=(str(folder),), output=str(root / "ds"), samples_per_shard=16, workers=1))
    return root / "ds"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def test_gpu_path_matches_cpu_path(dataset):
    cfg = LabelConfig(dataset=str(dataset), device="cuda", output_name="gpu", batch_size=8)
    gpu = run_label(cfg)
    counts = get_labeler(cfg).decode_counts  # the cached labeler of the run
    cpu = run_label(LabelConfig(dataset=str(dataset), device="cpu", output_name="cpu"))
    g = pq.read_table(Path(gpu.output)).to_pylist()
    c = pq.read_table(Path(cpu.output)).to_pylist()
    assert [r["key"] for r in g] == [r["key"] for r in c]
    agree = np.mean([a["labels"][0] == b["labels"][0] for a, b in zip(g, c)])
    assert agree >= 0.95
    diff = np.abs(np.array([a["label_probs"][0] for a in g]) - np.array([b["label_probs"][0] for b in c]))
    assert np.median(diff) < 0.02
    for r in g:
        p = np.asarray(r["label_probs"])
        assert np.all(np.diff(p) <= 1e-6) and p.sum() <= 1 + 1e-3
    assert sum(counts.values()) == len(g) and counts["failed"] == 0, counts


def test_deterministic_and_resumable(dataset):
    cfg = LabelConfig(dataset=str(dataset), device="cuda", output_name="det", batch_size=16)
    out = Path(run_label(cfg).output)
    first = _digest(out)
    victim = sorted(out.glob("*.parquet"))[1]
    victim.unlink()
    again = run_label(cfg)
    assert again.shards_done_now == 1
    assert _digest(out) == first  # same bytes for the same device and batch size


def test_host_decode_is_the_cpu_paths_pixels_and_reproducible(dataset):
    """``--decode host``: every image decoded on the host (none on the engines), in decode
    processes, labels the same bytes run to run (a fresh labeler each time) and the same as
    with host threads (``--host-procs 0``), top-1 as the CPU path's."""
    from dataclasses import replace

    from silverlabel.stages.label import close_labelers

    cfg = LabelConfig(dataset=str(dataset), device="cuda", output_name="host", batch_size=8, decode="host",
                      host_procs=2)
    out = Path(run_label(cfg).output)
    labeler = get_labeler(cfg)
    counts = labeler.decode_counts
    assert labeler.host_decoder is not None and labeler.host_decoder.counts["pillow"] == counts["pillow"]
    # laid out from the samples table's sizes: nothing spilled past its place, the ring never grew
    assert labeler.host_decoder.spilled == 0 and labeler.host_decoder.grown == 0
    assert counts["hw"] == counts["nvjpeg"] == 0 and counts["pillow"] > 0 and counts["failed"] == 0, counts
    first = _digest(out)
    for again in (cfg, replace(cfg, host_procs=0)):
        close_labelers()  # a new labeler, as a new process would have
        for p in out.glob("*.parquet"):
            p.unlink()
        assert run_label(again).shards_done_now == len(first)
        assert _digest(out) == first
    assert get_labeler(replace(cfg, host_procs=0)).host_decoder is None
    cpu = run_label(LabelConfig(dataset=str(dataset), device="cpu", output_name="cpu-h"))
    g = pq.read_table(out).to_pylist()
    c = pq.read_table(Path(cpu.output)).to_pylist()
    assert np.mean([a["labels"][0] == b["labels"][0] for a, b in zip(g, c)]) >= 0.95


def test_decode_both_splits_batches_between_host_and_gpu(dataset):
    """``--decode both``: half the batches on the host processes, half on the GPU's decoders
    (the same split run to run), every image labeled, top-1 as the CPU path's."""
    from dataclasses import replace

    from silverlabel.stages.label import close_labelers

    cfg = LabelConfig(dataset=str(dataset), device="cuda", output_name="both", batch_size=8, decode="both",
                      host_procs=2, host_share=0.5)
    out = Path(run_label(cfg).output)
    counts = get_labeler(cfg).decode_counts
    assert counts["pillow"] > 0 and counts["hw"] + counts["nvjpeg"] > 0 and counts["failed"] == 0, counts
    assert {pq.read_schema(f).metadata[b"silverlabel.decode"] for f in out.glob("*.parquet")} == {b"both 0.5"}
    rows = pq.read_table(out).to_pylist()
    assert sum(counts.values()) == len(rows)
    close_labelers()
    for p in out.glob("*.parquet"):
        p.unlink()
    run_label(cfg)
    assert get_labeler(cfg).decode_counts == counts  # the same batches on each side
    cpu = run_label(replace(cfg, device="cpu", output_name="cpu-both"))
    c = pq.read_table(Path(cpu.output)).to_pylist()
    assert [r["key"] for r in rows] == [r["key"] for r in c]
    assert np.mean([a["labels"][0] == b["labels"][0] for a, b in zip(rows, c)]) >= 0.95


def test_decode_auto_picks_gpu_for_a_light_teacher_and_host_past_the_line(dataset, monkeypatch):
    """``--decode auto`` (the default): efficientnet_lite0 stays on the GPU's decoders; with
    the line lowered below its FLOPs x processes, the same run decodes on the host and
    labels what ``--decode host`` labels."""
    from dataclasses import replace

    import silverlabel.inference as inference
    from silverlabel.stages.label import close_labelers

    cfg = LabelConfig(dataset=str(dataset), device="cuda", output_name="auto", batch_size=8, host_procs=8)
    assert cfg.decode == "auto"
    close_labelers()
    assert get_labeler(cfg).decode_mode == "gpu" and get_labeler(cfg).host_decoder is None
    close_labelers()
    monkeypatch.setattr(inference, "AUTO_HOST_FLOPS", 1.0)
    out = Path(run_label(cfg).output)
    labeler = get_labeler(cfg)
    assert labeler.decode_mode == "host" and labeler.host_decoder is not None
    assert labeler.decode_counts["hw"] == labeler.decode_counts["nvjpeg"] == 0
    assert {pq.read_schema(f).metadata[b"silverlabel.decode"] for f in out.glob("*.parquet")} == {b"host"}
    host = run_label(replace(cfg, decode="host", output_name="auto-host"))
    assert pq.read_table(out).to_pylist() == pq.read_table(Path(host.output)).to_pylist()
    close_labelers()


def test_gpu_decoder_host_mode_gives_pillows_pixels():
    import torch

    from silverlabel.inference import GpuDecoder, decode_rgb
    from silverlabel.replay_torch import ref_tensor

    photo = Image.fromarray(skimage.data.astronaut()).resize((301, 213))
    blobs = [_encoded(photo, format="JPEG", quality=90), _encoded(photo.convert("L"), format="JPEG"),
             _encoded(photo, format="JPEG", progressive=True), _encoded(photo, format="PNG")]
    dec = GpuDecoder("cuda", host=True)
    refs, errors, keep = dec.decode(blobs)
    assert errors == [None] * 4 and dec.counts["pillow"] == 4 and not dec.use_hw
    torch.cuda.synchronize()
    for r, b in zip(refs, blobs):
        got = ref_tensor(r, "cuda").cpu().numpy()
        assert np.array_equal(got, np.asarray(decode_rgb(b)))


def _encoded(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, **kw)
    return b.getvalue()


def test_decode_chain_counts_and_pixels():
    """Each format goes down the right path and gives the CPU path's pixels (Pillow's own
    decode exactly; GPU JPEG decoders within a few levels on average)."""
    import torch

    from silverlabel.inference import EvalTransform, GpuDecoder, resize_crop_batch

    photo = Image.fromarray(skimage.data.astronaut())
    blobs = {
        "baseline": _encoded(photo, format="JPEG", quality=92),
        "progressive": _encoded(photo, format="JPEG", quality=92, progressive=True),
        "gray": _encoded(photo.convert("L"), format="JPEG", quality=92),
        "cmyk": _encoded(photo.convert("CMYK"), format="JPEG", quality=92),
        "png": _encoded(photo, format="PNG"),
        "webp": _encoded(photo, format="WEBP", lossless=True),
        "broken": b"\xff\xd8\xff\xe0 not a jpeg",
    }
    dec = GpuDecoder("cuda")
    refs, errors, keep = dec.decode(list(blobs.values()))
    names = list(blobs)
    assert [e is not None for e in errors] == [n == "broken" for n in names]
    # progressive, CMYK, PNG, WebP: Pillow on host threads; baseline and gray: the engines (or nvJPEG)
    assert dec.counts["pillow"] == 4 and dec.counts["failed"] == 1
    assert dec.counts["hw"] + dec.counts["nvjpeg"] == 2
    if dec.use_hw:
        assert dec.counts["hw"] == 2
    tf = EvalTransform(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    ok = [j for j, r in enumerate(refs) if r is not None]
    crops = resize_crop_batch([refs[j] for j in ok], tf, "cuda").cpu()
    torch.cuda.synchronize()
    cpu = tf.cpu()
    for i, j in enumerate(ok):
        ref = cpu.transforms[1](cpu.transforms[0](Image.open(io.BytesIO(blobs[names[j]])).convert("RGB")))
        diff = (crops[i].int() - torch.from_numpy(np.array(ref)).permute(2, 0, 1).int()).abs().float()
        if names[j] in ("progressive", "cmyk", "png", "webp"):
            assert diff.max() <= 3 and diff.mean() < 0.05, (names[j], diff.max(), diff.mean())
        else:
            assert diff.mean() < 2.0, (names[j], diff.mean())
