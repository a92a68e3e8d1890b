"""``silverlabel.hostdecode.HostDecoder``: label's ``--decode host`` processes, on the CPU
(real spawned processes, real shared memory; the copy goes to CPU memory instead of a GPU)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from silverlabel.augment import decode_rgb_array
from silverlabel.hostdecode import HostDecoder


def _blobs() -> list[bytes]:
    """Photos of varied sizes and kinds: RGB/gray/CMYK JPEGs, PNG, WebP, one broken."""
    import skimage.data
    from PIL import Image

    photo = Image.fromarray(skimage.data.chelsea())
    out = []
    for j, (mode, fmt) in enumerate([("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("CMYK", "JPEG"),
                                     ("RGB", "WEBP"), ("RGB", "JPEG"), ("RGB", "JPEG"), ("L", "PNG")] * 2):
        b = io.BytesIO()
        photo.resize((97 + 13 * j, 61 + 7 * j)).convert(mode).save(b, fmt)
        out.append(b.getvalue())
    out.insert(5, out[0][:40] + b"\x00" * 200)  # broken
    out.append(_damaged(out[0]))
    return out


def _damaged(jpeg: bytes) -> bytes:
    """``jpeg`` with a restart marker in its entropy data: simplejpeg gives up on it after
    taking its buffer, Pillow decodes it (into a second buffer)."""
    calls: list = []
    for p in range(len(jpeg) // 2, len(jpeg) - 10, 97):
        bad = jpeg[:p] + b"\xff\xd0" + jpeg[p + 2:]
        calls.clear()
        try:
            decode_rgb_array(bad, lambda shape: calls.append(shape) or np.empty(shape, np.uint8))
        except Exception:  # noqa: BLE001 - not this one
            continue
        if len(calls) == 2:
            return bad
    raise AssertionError("no such damage found")


@pytest.fixture()
def pool_file(tmp_path):
    blobs = _blobs()
    path = tmp_path / "blobs.bin"
    path.write_bytes(b"pad" + b"".join(blobs))
    offs = np.cumsum([3] + [len(b) for b in blobs]).tolist()
    return str(path), blobs, [(offs[j], len(b)) for j, b in enumerate(blobs)]


def test_host_decoder_gives_the_cpu_paths_pixels(pool_file):
    """Every image comes back as rule 1's pixels (decode_rgb_array), in order, batch after
    batch (more batches than the ring has slots); the broken one gives its error's text and
    is counted failed."""
    path, blobs, locs = pool_file
    hd = HostDecoder(2, "cpu")
    try:
        assert hd.start(len(locs))
        inflight = []
        for _ in range(HostDecoder.SLOTS + 2):
            inflight.append(hd.submit(path, locs))
            if len(inflight) == HostDecoder.SLOTS - 1:
                images, errors, _keep = hd.finish(inflight.pop(0))
                _check(images, errors, blobs)
        while inflight:
            images, errors, _keep = hd.finish(inflight.pop(0))
            _check(images, errors, blobs)
        assert hd.counts["failed"] == HostDecoder.SLOTS + 2
        assert hd.counts["pillow"] == (len(blobs) - 1) * (HostDecoder.SLOTS + 2)
        assert hd.spilled == 0 and hd.want == 0
    finally:
        hd.close()


def _check(images, errors, blobs) -> None:
    assert len(images) == len(errors) == len(blobs)
    for j, (im, err, b) in enumerate(zip(images, errors, blobs)):
        if j == 5:
            assert im is None and err and "Error" in err
            continue
        assert err is None and np.array_equal(im.numpy(), decode_rgb_array(b)), j


def test_host_decoder_spills_past_a_full_region_then_grows(pool_file):
    """A ring too small for a batch: the images beyond a region's room come back pickled,
    still right, and ``grow`` remakes the ring big enough that the next batch fits."""
    path, blobs, locs = pool_file
    hd = HostDecoder(2, "cpu", bytes_per_image=1024)  # 16 MiB slots (the least), then the batch is made bigger
    try:
        assert hd.start(len(locs))
        big = locs * 40  # ~700 images, ~28 MB per chunk of 2
        images, errors, _ = hd.finish(hd.submit(path, big))
        _check(images[:len(blobs)], errors[:len(blobs)], blobs)
        _check(images[-len(blobs):], errors[-len(blobs):], blobs)
        assert hd.spilled > 0 and hd.want > hd.ring.slot_bytes
        small = hd.ring.slot_bytes
        hd.grow()
        assert hd.ring.slot_bytes > small
        spilled = hd.spilled
        images, errors, _ = hd.finish(hd.submit(path, big))
        _check(images[-len(blobs):], errors[-len(blobs):], blobs)
        assert hd.spilled == spilled and hd.want == 0
    finally:
        hd.close()


def test_host_decoder_drop_frees_the_slot(pool_file):
    """A batch given up (the run stopped) frees its slot: every slot can be taken again."""
    path, _blobs_, locs = pool_file
    hd = HostDecoder(1, "cpu")
    try:
        assert hd.start(len(locs))
        for _ in range(2 * HostDecoder.SLOTS):
            hd.drop(hd.submit(path, locs))
        assert not any(hd.ring.taken)
    finally:
        hd.close()


def test_a_dropped_ring_is_unlinked():
    """A ring dropped without ``close()`` (its owner dropped from a cache) still frees its
    shared memory: its finalizer unregisters it from CUDA where it was registered, unmaps and
    unlinks it (a range unmapped while registered would stay pinned in the driver, and memory
    later mapped there was copied from the stale pages)."""
    import gc

    import torch

    from silverlabel.hostdecode import DecodeRing

    ring = DecodeRing(1 << 20, 2, torch, register=False)
    name = ring.shm.name.lstrip("/")
    assert os.path.exists(f"/dev/shm/{name}")
    del ring
    gc.collect()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_host_turn_spreads_the_share_evenly():
    from silverlabel.inference import host_turn

    assert [host_turn(i, 0.5) for i in range(6)] == [False, True] * 3
    assert sum(host_turn(i, 0.3) for i in range(100)) == 30
    assert not any(host_turn(i, 0.0) for i in range(10)) and all(host_turn(i, 1.0) for i in range(10))


def test_split_batches_deals_by_index_to_two_consuming_threads():
    """``--decode both``'s routing: each batch to the host or the GPU side by its index,
    consumed by a thread per side at once, every batch once; both sides end with the input,
    and an abort ends them early."""
    import threading

    from silverlabel.inference import host_turn, split_batches

    abort = threading.Event()
    route, host, gpu = split_batches(iter(range(101)), 0.4, abort)
    got: dict[str, list[int]] = {}
    sides = (("host", host), ("gpu", gpu))
    threads = [threading.Thread(target=route)] + [
        threading.Thread(target=lambda n=n, it=it: got.__setitem__(n, list(it))) for n, it in sides]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert got["host"] == [i for i in range(101) if host_turn(i, 0.4)]
    assert got["gpu"] == [i for i in range(101) if not host_turn(i, 0.4)]

    abort = threading.Event()
    route, host, gpu = split_batches(iter(range(1000)), 0.5, abort)
    t = threading.Thread(target=route)
    t.start()
    assert next(host) == 1 and next(gpu) == 0
    abort.set()
    t.join(timeout=20)
    assert not t.is_alive() and len(list(host)) < 10 and len(list(gpu)) < 10


def test_decode_region_points_at_the_last_allocation(tmp_path, monkeypatch):
    """A decode that allocates twice (simplejpeg gives up mid-stream, Pillow decodes again)
    is read from its second allocation, made where the first was (no room lost); one beyond
    the region's room comes back as an array."""
    from multiprocessing import shared_memory

    from silverlabel import hostdecode

    def twice(data: bytes, alloc):
        alloc((2, 3, 3))[...] = 1  # the abandoned partial decode
        out = alloc((2, 3, 3))
        out[...] = data[0]
        return out

    monkeypatch.setattr(hostdecode, "decode_rgb_array", twice)
    path = tmp_path / "b.bin"
    path.write_bytes(bytes([7, 9]))
    shm = shared_memory.SharedMemory(create=True, size=1024)
    try:
        out, need = hostdecode.decode_region(shm.name, str(path), [(0, 1), (1, 1)], 100, 60)
        flat = np.ndarray((shm.size,), np.uint8, buffer=shm.buf)
        off, h, w = out[0]
        assert (h, w) == (2, 3) and (flat[off:off + 18] == 7).all() and off == 100  # the first one's place
        assert out[1] == (118, 2, 3) and (flat[118:136] == 9).all()
        out, need = hostdecode.decode_region(shm.name, str(path), [(0, 1), (1, 1), (0, 1)], 200, 40)
        assert isinstance(out[2], np.ndarray) and (out[2] == 7).all()  # 54 bytes asked of a 40-byte room
        assert need == 54
        del flat
    finally:
        hostdecode.attach_shm(hostdecode._STATE, None)
        os.close(hostdecode._STATE.pop("fd"))
        hostdecode._STATE.pop("path")
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("prefault", [False, True])
def test_attach_shm_prefault_maps_every_page(prefault):
    """With ``prefault`` the attachment's pages are mapped at once (by reads), so the writes
    that follow take no page faults; without it, each page faults on its first write."""
    import mmap
    import resource
    from multiprocessing import shared_memory

    from silverlabel.hostdecode import attach_shm

    pages = 2048
    shm = shared_memory.SharedMemory(create=True, size=pages * mmap.PAGESIZE)
    state: dict = {}
    try:
        shm.buf[::mmap.PAGESIZE] = b"\x01" * pages  # the pages exist (another process wrote them)
        attach_shm(state, shm.name, prefault=prefault)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state["buf"][::mmap.PAGESIZE] = 2
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert (faults < pages // 10) if prefault else (faults >= pages // 2), faults
    finally:
        attach_shm(state, None)
        shm.close()
        shm.unlink()


def test_host_decoder_lays_out_a_batch_from_the_sizes_given(pool_file):
    """With each image's size (the samples table's), the ring is sized for the largest batch
    at start and each process writes exactly its images' bytes: nothing spills, nothing
    grows, even where equal regions would overflow; an image whose size is not the one given
    comes back pickled, still right."""
    from silverlabel.inference import _largest_batch

    path, blobs, locs = pool_file
    shapes = []
    for b in blobs:
        try:
            shapes.append(decode_rgb_array(b).shape[:2])
        except Exception:  # noqa: BLE001 - the broken one: any size
            shapes.append((10, 10))
    big = locs * 40
    sizes = {f"k{i}": shapes[i % len(shapes)] for i in range(len(big))}
    slot = _largest_batch(sizes, len(big))
    assert slot == sum(h * w * 3 for h, w in sizes.values()) + max(h * w * 3 for h, w in shapes)
    hd = HostDecoder(2, "cpu", bytes_per_image=1024)
    try:
        assert hd.start(len(big), slot) and hd.ring.slot_bytes >= slot
        images, errors, _ = hd.finish(hd.submit(path, big, list(sizes.values())))
        _check(images[:len(blobs)], errors[:len(blobs)], blobs)
        _check(images[-len(blobs):], errors[-len(blobs):], blobs)
        assert hd.spilled == 0 and hd.want == 0
        wrong = [(h - 1, w) for h, w in shapes]  # every size a row short: the last of each chunk spills
        images, errors, _ = hd.finish(hd.submit(path, locs, wrong))
        _check(images, errors, blobs)
        assert hd.spilled > 0 and hd.want == 0  # sizes that lie spill, they do not grow the ring
        ring = hd.ring
        assert hd.start(len(locs), slot // 2) and hd.ring is ring  # big enough: kept
        assert hd.start(len(locs), 2 * ring.slot_bytes) and hd.ring is not ring and hd.ring.slot_bytes > 2 * slot
    finally:
        hd.close()


def test_decode_auto_rule_counts_the_teachers_flops(caplog):
    """``label --decode auto``: the teacher's FLOPs per image, counted on the real model
    (efficientnet_lite0: ~0.77 GFLOP at 224 px), times the decode processes against
    AUTO_HOST_FLOPS; fewer than AUTO_HOST_MIN_PROCS processes never pick the host; a CPU
    labeler stays on the CPU path whatever the rule says."""
    import logging

    from silverlabel.inference import AUTO_HOST_FLOPS, AUTO_HOST_MIN_PROCS, Labeler, auto_host_decode, flops_per_image
    from silverlabel.teachers import TeacherSpec, create_teacher

    lab = Labeler([create_teacher(TeacherSpec("efficientnet_lite0"))], "in1k", 5, device="cpu", decode_threads=1,
                  host_procs=64, auto_decode=True)
    try:
        assert lab.decode_mode == "cpu" and lab.host_decoder is None
        flops = flops_per_image(lab)
        assert 0.6e9 < flops < 0.9e9, flops
        light = max(AUTO_HOST_MIN_PROCS, int(AUTO_HOST_FLOPS / flops) - 1)  # just under the line
        with caplog.at_level(logging.INFO, logger="silverlabel.inference"):
            assert not auto_host_decode(lab, light)
            assert auto_host_decode(lab, int(AUTO_HOST_FLOPS / flops) + 1)
            assert not auto_host_decode(lab, AUTO_HOST_MIN_PROCS - 1)
        assert "--decode auto: host" in caplog.text and "GFLOP per image" in caplog.text
    finally:
        lab.close()


def test_decode_auto_line_puts_vit_l_on_the_host_of_an_h200_machine():
    """The line as calibrated on the lent H200 (14 decode processes): ViT-L/16 (123 GFLOP per
    image) on the host, ViT-B/16 (35) and efficientnet_lite0 (0.77) on the GPU's decoders; 7
    processes never feed a teacher, 30 feed ViT-B/16 too."""
    from silverlabel.inference import host_feeds

    assert host_feeds(123.15e9, 14) and not host_feeds(35.16e9, 14) and not host_feeds(0.77e9, 14)
    assert not host_feeds(1e15, 7) and host_feeds(35.16e9, 30)
