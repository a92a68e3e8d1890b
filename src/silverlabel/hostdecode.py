"""Host image decode in worker processes, into page-locked shared memory.

Decoding on host threads in the process that drives a GPU contends for its GIL with the
launches (reinforce's replay thread took 3x as long while a batch decoded on threads), and a
GPU's own decoders share its SMs with the model (next to a ViT-B/16 on an H200 the JPEG
decode kept 8% of its rate). Here spawned processes decode (:func:`decode_rgb_array`:
libjpeg-turbo without the GIL for JPEGs, Pillow for the rest: the CPU path's pixels) straight
into a :class:`DecodeRing`, shared memory registered with CUDA, so a batch goes to the device
in a few DMA copies. Used by ``reinforce`` (its own layout, from the shard's headers) and by
``label --decode host`` (:class:`HostDecoder`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing as mp
import os
import threading
import time
import weakref
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from silverlabel.augment import decode_rgb_array
log = logging.getLogger(__name__)


def shm_has_room(nbytes: int) -> bool:
    """Whether ``/dev/shm`` has room for ``nbytes`` of shared memory with margin (a full tmpfs
    would SIGBUS the writers; containers often mount a 64 MB one)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return True  # no /dev/shm (macOS): POSIX shm lives elsewhere
    return nbytes <= st.f_bavail * st.f_frsize // 2


def watch_parent(parent: int) -> None:
    """A worker process's start (a pool's initializer): exit if the parent goes (a killed worker or actor must not
    leave replay processes behind)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def attach_shm(state: dict[str, Any], shm_name: str | None, prefault: bool = False) -> None:
    """In a worker process: ``state``'s attachment of shared memory ``shm_name`` (``shm``,
    ``buf``: a uint8 array over it), reattached when the name changes, the old one closed.

    ``prefault``: map every page now, by reading one byte of each (a write would clobber
    what other processes are writing there). Otherwise each page faults on its first write
    from this process, and a process meets fresh pages for as long as it has not yet
    written into every slot and region: a decode ring of 768 MiB is 196k faults per process,
    ~20% of a 2-core machine's decode rate in its first passes."""
    if state.get("shm_name", "") != shm_name:
        state.pop("buf", None)
        if state.get("shm") is not None:
            with contextlib.suppress(BufferError):
                state["shm"].close()
        # spawned children share the creator's resource tracker (a set of names): attaching adds
        # nothing to it, and the creator's unlink unregisters the name
        state["shm"] = shared_memory.SharedMemory(name=shm_name) if shm_name else None
        state["buf"] = np.ndarray((state["shm"].size,), np.uint8, buffer=state["shm"].buf) if shm_name else None
        state["shm_name"] = shm_name
        if prefault and shm_name:
            int(state["buf"][::mmap.PAGESIZE].sum(dtype=np.uint64))  # a read per page (tmpfs maps it writable)


class DecodeRing:
    """Page-locked shared memory that the decode processes write batches of pixels into:
    ``slots`` slots of ``slot_bytes``. A slot is taken by a batch's load and free again once
    its copy to the device has run (an event recorded after it on the replay's stream).

    Registered with CUDA (``cudaHostRegister``) so that the copy is one asynchronous DMA from
    where the processes wrote; should registration fail, the copies are staged by the driver
    (slower, still correct). Kept across a worker's shards (two at once where shards
    overlap); a shard whose batches need more makes a bigger one, and the old one goes when
    its last shard ends."""

    def __init__(self, slot_bytes: int, slots: int, torch: Any, register: bool = True):
        self.torch, self.slot_bytes, self.slots = torch, slot_bytes, slots
        self.shm = shared_memory.SharedMemory(create=True, size=slot_bytes * slots)
        self.host = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
        self.registered = False
        try:  # flag 1: cudaHostRegisterPortable (page-locked for every CUDA context), as torch's own
            if register:
                self.registered = int(torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), self.host.numel(), 1)) == 0
        except Exception:  # noqa: BLE001 - no CUDA runtime binding: staged copies
            self.registered = False
        if register and not self.registered:
            log.warning("could not page-lock the decode ring: copies to the GPU are staged")
        self.events: list[Any] = [None] * slots
        # unregistered before its memory is unmapped, however the ring goes (close, or dropped
        # with its owner): a range unmapped while registered stays pinned in the driver. With
        # rings dropped unregistered, reinforce's GPU test run after label's labeled garbage on
        # the H200 (likely: later memory mapped at the same address copied from the old pages)
        self._free = weakref.finalize(self, _free_ring, torch, self.shm,
                                      self.host.data_ptr() if self.registered else None, self.events)
        self.taken = [False] * slots
        self.next = 0
        self.users = 0  # shards using it (under _RING_LOCK)
        self.retired = False
        self.cond = threading.Condition()

    def acquire(self) -> int:
        """A slot no batch holds (the load thread waits for one), once its last copy to the
        device has run."""
        with self.cond:
            while all(self.taken):
                self.cond.wait()
            slot = next(s % self.slots for s in range(self.next, self.next + self.slots) if not self.taken[s % self.slots])
            self.taken[slot], self.next = True, (slot + 1) % self.slots
            ev = self.events[slot]
        if ev is not None:
            ev.synchronize()  # a blocking event: the thread sleeps
        return slot

    def release(self, slot: int, stream: Any = None) -> None:
        """``slot``'s copy is queued on ``stream`` (free once it has run); without ``stream``
        the slot was never copied from (a failed or dropped batch): free now."""
        ev = None
        if stream is not None:
            ev = self.torch.cuda.Event(blocking=True)
            ev.record(stream)
        with self.cond:
            if ev is not None:
                self.events[slot] = ev
            self.taken[slot] = False
            self.cond.notify_all()

    def close(self) -> None:
        """Wait for the copies queued from it, unregister it, unmap it (once nothing else
        views it) and unlink it."""
        self.host = None
        self._free()


def _free_ring(torch: Any, shm: shared_memory.SharedMemory, registered_at: int | None, events: list[Any]) -> None:
    try:
        for ev in events:
            if ev is not None:
                ev.synchronize()
        if registered_at is not None:
            int(torch.cuda.cudart().cudaHostUnregister(registered_at))
    except Exception as e:  # noqa: BLE001 - at exit CUDA may be gone already
        log.debug("decode ring: %s: %s", type(e).__name__, e)
    with contextlib.suppress(BufferError):
        shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


# -- label's host decode ----------------------------------------------------------------

_STATE: dict[str, Any] = {}  # in a decode process: the open file and the ring it writes into


def decode_region(shm_name: str, path: str, locs: list[tuple[int, int]], at: int, room: int
                  ) -> tuple[list[Any], int]:
    """In a decode process: the images at ``locs`` ((offset, size) members of file ``path``,
    read in one go) decoded one after another into the ring's bytes ``[at, at + room)``.

    Returns (per image: ``(offset, height, width)`` in the ring, a uint8 [H, W, 3] array for
    an image beyond the region's room (pickled back), or the error's text; the bytes the whole
    list would need)."""
    from silverlabel.formats.wds import read_members

    attach_shm(_STATE, shm_name, prefault=True)
    if _STATE.get("path") != path:
        if _STATE.get("fd") is not None:
            os.close(_STATE["fd"])
        _STATE["fd"], _STATE["path"] = os.open(path, os.O_RDONLY), path
    buf, used, need, out = _STATE["buf"], 0, 0, []
    for blob in read_members(_STATE["fd"], locs, strict=False):  # a short member fails its decode
        # where the pixels went: the last allocation counts, in the same place as any before
        # it (a JPEG that simplejpeg gives up on mid-stream is decoded again by Pillow, which
        # asks again); None: beyond the region's room, in memory of its own
        last: list[int | None] = [None]
        used0, need0 = used, need

        def alloc(shape: tuple[int, int, int]) -> np.ndarray:
            nonlocal used, need
            n = int(np.prod(shape))
            need = need0 + n
            if used0 + n > room:
                last[0], used = None, used0
                return np.empty(shape, np.uint8)
            last[0], used = at + used0, used0 + n
            return buf[last[0]:last[0] + n].reshape(shape)

        try:
            arr = decode_rgb_array(blob, alloc)
        except Exception as e:  # noqa: BLE001 - the caller records it against the sample
            out.append(f"{type(e).__name__}: {e}")
            continue
        out.append((last[0], arr.shape[0], arr.shape[1]) if last[0] is not None else arr)
    return out, need


@dataclass
class _Batch:
    """A batch in the decode processes: its ring slot and one task per chunk of images."""

    slot: int
    chunks: list[tuple[int, int]]  # (first image, images) per task
    regions: list[tuple[int, int]]  # (offset in the slot, bytes) per task
    exact: bool  # regions from the images' sizes (else equal: a region too small grows the ring)
    futures: list[Any] = field(default_factory=list)


class HostDecoder:
    """``label --decode host`` on a GPU: each batch's images decoded by ``procs`` spawned
    processes into a slot of a :class:`DecodeRing`, then copied to the device.

    A batch is cut into one chunk per process, and each chunk gets a region of the slot,
    which its process fills image after image. Where the caller knows the images' sizes (label:
    the samples table's width and height), the ring is sized for the largest batch at
    ``start`` and each region is exactly its images' bytes. Otherwise the regions are equal,
    the first slots hold ``bytes_per_image`` per image (1 MiB: a 640x480 RGB image is 0.9
    MiB), and a batch that overflows a region has the ring remade bigger before the next one
    (``grow``: a stall while the batches in flight finish and new memory is page-locked).
    Either way an image beyond its region's room comes back pickled (slower, still right). ``submit`` starts a batch; ``finish`` waits for it and queues its copy on the
    current stream. ``counts``: ``pillow`` (decoded here) and ``failed``."""

    SLOTS = 3  # two batches decoding while the third's copy runs

    def __init__(self, procs: int, device: Any, bytes_per_image: int = 1 << 20):
        import torch

        self.torch, self.device, self.procs = torch, torch.device(device), max(1, procs)
        self.cuda = self.device.type == "cuda"
        self.bytes_per_image = bytes_per_image
        self.pool: ProcessPoolExecutor | None = None
        self.ring: DecodeRing | None = None
        self.want = 0  # slot bytes a batch needed that the ring lacked (remade at the next grow)
        self.counts: Counter = Counter()
        self.spilled = 0  # images beyond their region's room (pickled back)
        self.grown = 0  # times the ring was remade bigger

    def start(self, batch: int, slot_bytes: int | None = None) -> bool:
        """Processes and ring for batches of ``batch`` images, or of ``slot_bytes`` where the
        caller knows the images' sizes (a smaller ring is remade: call it with no batch in
        flight); False when ``/dev/shm`` lacks room for the ring (the caller decodes on
        threads)."""
        if slot_bytes and self.ring is not None and self.ring.slot_bytes < slot_bytes:
            self.ring.close()  # a quarter more than asked below: the next shards likely fit
            self.ring = None
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.procs, mp_context=mp.get_context("spawn"),
                                            initializer=watch_parent, initargs=(os.getpid(),))
            # stopped with its owner too (a Labeler dropped from a cache without close())
            self._stop = weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)
            futures_wait([self.pool.submit(os.getpid) for _ in range(self.procs)])  # every process up
        if self.ring is None:  # too big for /dev/shm: the default size (equal regions, growing)
            return (bool(slot_bytes) and self._make_ring(slot_bytes * 5 // 4, quiet=True)) \
                or self._make_ring(batch * self.bytes_per_image)
        return True

    def _make_ring(self, slot_bytes: int, quiet: bool = False) -> bool:
        slot_bytes = -(-slot_bytes // (16 << 20)) * (16 << 20)  # whole 16 MiB
        if not shm_has_room(slot_bytes * self.SLOTS):
            if quiet:
                return False
            log.warning("/dev/shm lacks room for a %d MiB decode ring: decoding on threads",
                        slot_bytes * self.SLOTS >> 20)
            return False
        self.ring = DecodeRing(slot_bytes, self.SLOTS, self.torch, register=self.cuda)
        return True

    def grow(self) -> None:
        """Remake the ring as big as the batches need, where one lacked room; call it with no
        batch in flight."""
        if self.ring is not None and self.want > self.ring.slot_bytes:
            t0 = time.perf_counter()
            old, self.ring = self.ring, None
            old.close()  # its room first
            if not self._make_ring(self.want) and not self._make_ring(old.slot_bytes):
                raise RuntimeError("the decode ring could not be made again: /dev/shm is full")
            # a one-time cost per process (the new memory is faulted in and page-locked), paid
            # again only by a batch bigger than any before; logged, since a short run feels it
            log.info("decode ring: slots of %d MiB (were %d MiB) in %.2f s", self.ring.slot_bytes >> 20,
                     old.slot_bytes >> 20, time.perf_counter() - t0)
            self.grown += 1
        self.want = 0

    def submit(self, path: str, locs: list[tuple[int, int]], shapes: list[tuple[int, int]] | None = None) -> _Batch:
        """Start decoding the members at ``locs`` of ``path`` (waits for a free slot). With
        ``shapes`` (each image's height and width, e.g. from the samples table), each chunk's
        region is exactly its images' bytes; without, the slot is cut into equal regions."""
        ring = self.ring
        slot = ring.acquire()
        n = len(locs)
        per = max(4, -(-n // self.procs))
        chunks = [(c, min(per, n - c)) for c in range(0, n, per)]
        ends = np.cumsum([h * w * 3 for h, w in shapes]).tolist() if shapes is not None else []
        exact = bool(ends) and ends[-1] <= ring.slot_bytes
        if exact:  # the layout the sizes give: an image of another size spills, nothing grows
            regions = [(ends[c - 1] if c else 0, ends[c + k - 1] - (ends[c - 1] if c else 0)) for c, k in chunks]
        else:
            room = ring.slot_bytes // len(chunks) // 64 * 64
            regions = [(i * room, room) for i in range(len(chunks))]
        b = _Batch(slot, chunks, regions, exact)
        try:
            for (c, k), (at, room) in zip(chunks, regions):
                b.futures.append(self.pool.submit(decode_region, ring.shm.name, path, locs[c:c + k],
                                                  slot * ring.slot_bytes + at, room))
        except BaseException:
            futures_wait(b.futures)
            ring.release(slot)
            raise
        return b

    def finish(self, b: _Batch) -> tuple[list[Any], list[str | None], list[Any]]:
        """Wait for batch ``b`` and queue its copy to the device on the current stream:
        (per image a uint8 [H, W, 3] device tensor or None, per image its error or None,
        keepalive). The slot is free again once the copy has run."""
        torch, ring = self.torch, self.ring
        futures_wait(b.futures)
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        try:
            results = [f.result() for f in b.futures]  # raises where a process died
            base = b.slot * ring.slot_bytes
            spans = []  # (start, end) of each chunk's bytes in the ring
            for (_at, room), (out, need) in zip(b.regions, results):
                spots = [o for o in out if isinstance(o, tuple)]
                if spots:
                    spans.append((spots[0][0], spots[-1][0] + spots[-1][1] * spots[-1][2] * 3))
                if need > room and not b.exact:
                    self.want = max(self.want, need * len(b.chunks) * 5 // 4)
            used = max((hi for _lo, hi in spans), default=base) - base  # the slot's bytes written
            dev = torch.empty(used, dtype=torch.uint8, device=self.device)
            for lo, hi in spans:
                dev[lo - base:hi - base].copy_(ring.host[lo:hi], non_blocking=True)
        finally:
            ring.release(b.slot, stream)
        images: list[Any] = []
        errors: list[str | None] = []
        keep: list[Any] = [dev]
        for out, _need in results:
            for o in out:
                if isinstance(o, str):
                    images.append(None)
                    errors.append(o)
                    self.counts["failed"] += 1
                    continue
                if isinstance(o, tuple):
                    off, h, w = o
                    images.append(dev[off - base:off - base + h * w * 3].view(h, w, 3))
                else:  # beyond its region's room
                    host = torch.from_numpy(o)
                    if self.cuda:
                        host = host.pin_memory()
                    images.append(host.to(self.device, non_blocking=True))
                    keep.append(host)
                    self.spilled += 1
                errors.append(None)
                self.counts["pillow"] += 1
        return images, errors, keep

    def drop(self, b: _Batch) -> None:
        """Give up batch ``b`` (the run stopped): its slot is free once its tasks are done."""
        futures_wait(b.futures)
        self.ring.release(b.slot)

    def close(self) -> None:
        if self.pool is not None:
            self._stop.detach()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
