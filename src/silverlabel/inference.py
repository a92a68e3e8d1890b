"""Batched teacher inference over WebDataset shards, on the CPU or a CUDA GPU.

The label stage (and later reinforce) feed JPEG bytes in and get per-image probabilities
in a target label space out. Two paths share one contract:

- **CPU**: Pillow decodes on a thread pool (decoding releases the GIL) and timm's eval
  transform (resize shorter side to ``floor(size / crop_pct)``, center crop, normalize)
  prepares each image exactly as the teacher's pretrained config says.
- **GPU**: JPEGs are decoded in batches on the GPU (nvJPEG through
  ``torchvision.io.decode_jpeg(device="cuda")``, split over a few host threads since
  nvJPEG's Huffman stage runs on the CPU), resized with Pillow's two-pass antialiased
  filter (same-size images in one call), center-cropped and normalized there, then run
  under fp16 autocast (see ``PRECISIONS``) with channels_last, optionally
  ``torch.compile``d. A producer thread reads the tar and prepares batch i+1 on its own
  CUDA stream while the model runs batch i; results come back through pinned host
  buffers, one batch behind. Top-k is taken on the GPU. Images nvJPEG refuses fall back
  to Pillow.

    >>> import torch
    >>> tfm = EvalTransform(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    >>> tfm.scale_size
    256
"""

from __future__ import annotations

import io
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from silverlabel.errors import UserError
from silverlabel.teachers import Teacher


#: GPU autocast precisions. fp16 is the default: on 300 low-confidence photos its top-1
#: matched the fp32 CPU path on every image, bf16 on 94.7% (its 8-bit mantissa flips
#: near-ties); tensor-core speed is the same on Hopper.
PRECISIONS = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class EvalTransform:
    """A teacher's eval preprocessing, as numbers (from timm's data config)."""

    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_teacher(cls, teacher: Teacher, overrides: dict[str, Any] | None = None) -> EvalTransform:
        cfg = {**teacher.data_config, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        size = cfg["input_size"][-1] if "input_size" in cfg else cfg["size"]
        return cls(int(size), float(cfg.get("crop_pct", 0.875)), str(cfg.get("interpolation", "bicubic")),
                   tuple(cfg["mean"]), tuple(cfg["std"]))

    @property
    def scale_size(self) -> int:
        return math.floor(self.size / self.crop_pct)  # timm's rule

    def cpu(self):
        """The torchvision transform timm builds for evaluation (PIL in, tensor out)."""
        import timm.data

        return timm.data.create_transform(
            input_size=(3, self.size, self.size), interpolation=self.interpolation,
            crop_pct=self.crop_pct, mean=self.mean, std=self.std, is_training=False,
        )


def decode_rgb(data: bytes) -> Image.Image:
    """Pillow decode to RGB (raises on bad data)."""
    im = Image.open(io.BytesIO(data))
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------
# teachers -> probabilities in the target space


class GpuPreprocessor:
    """nvJPEG decode + resize/crop on one GPU (used in-process and by decode workers)."""

    def __init__(self, device: Any, threads: int = 4):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.gpu_decode_threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.gpu_decode_threads)

    def decode_chunk(self, blobs: list[bytes]) -> tuple[list[Any], list[str | None], Any]:
        """nvJPEG-decode one chunk on this thread's own stream; Pillow for what it refuses."""
        import torchvision.io as tio

        torch = self.torch
        stream = torch.cuda.Stream(self.device)
        errors: list[str | None] = [None] * len(blobs)
        with torch.cuda.stream(stream):
            datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
            try:
                images = tio.decode_jpeg(datas, device=self.device, mode=tio.ImageReadMode.RGB)
            except Exception:  # one bad image fails the batch call: find it
                images = []
                for d in datas:
                    try:
                        images.append(tio.decode_jpeg(d, device=self.device, mode=tio.ImageReadMode.RGB))
                    except Exception:
                        images.append(None)
            for j, im in enumerate(images):
                if im is None:
                    try:
                        arr = np.asarray(decode_rgb(blobs[j]))
                        images[j] = torch.from_numpy(arr).permute(2, 0, 1).to(self.device)
                    except Exception as e:
                        errors[j] = f"{type(e).__name__}: {e}"
            done = torch.cuda.Event()
            done.record(stream)
        return images, errors, done

    def decode(self, blobs: list[bytes]) -> tuple[list[Any], list[str | None]]:
        """Decode a batch on the GPU, split over ``gpu_decode_threads`` threads (nvJPEG's
        Huffman stage runs on the host), then make the current stream wait for all of it."""
        torch = self.torch
        k = min(self.gpu_decode_threads, max(1, len(blobs) // 16))
        step = -(-len(blobs) // k)
        chunks = [blobs[i : i + step] for i in range(0, len(blobs), step)]
        if len(chunks) == 1:
            parts = [self.decode_chunk(chunks[0])]
        else:
            parts = list(self.pool.map(self.decode_chunk, chunks))
        images: list[Any] = []
        errors: list[str | None] = []
        current = torch.cuda.current_stream(self.device)
        for ims, errs, ev in parts:
            current.wait_event(ev)
            images.extend(ims)
            errors.extend(errs)
        return images, errors

    def prep(self, images: list[Any], tf: EvalTransform, normalize: bool = True):
        """Resize shorter side, center crop, normalize: (N,3,S,S) channels_last.

        With ``normalize=False`` the crop comes back as uint8 (what decode workers send).

        The resize is two antialiased 1-D passes (width, then height), each rounded to
        8 bits, as Pillow does: the result matches the CPU path's pixels to within one
        level. Images of the same size are resized together in one call.
        """
        torch = self.torch
        F = torch.nn.functional
        n = len(images)
        out = torch.empty((n, 3, tf.size, tf.size), device=self.device, dtype=torch.float32)
        mode = "bicubic" if tf.interpolation == "bicubic" else "bilinear"
        groups: dict[tuple[int, int], list[int]] = {}
        for j, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(j)
        s = tf.scale_size  # shorter side -> s, as torchvision's Resize(int)
        for (h, w), idx in groups.items():
            nh, nw = (max(1, int(s * h / w)), s) if w <= h else (s, max(1, int(s * w / h)))
            x = torch.stack([images[j] for j in idx]).float()
            if nw != w:
                x = F.interpolate(x, size=(h, nw), mode=mode, antialias=True, align_corners=False).clamp_(0, 255).round_()
            if nh != h:
                x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=True, align_corners=False).clamp_(0, 255).round_()
            top = int(round((nh - tf.size) / 2.0))
            left = int(round((nw - tf.size) / 2.0))
            crop = x[:, :, top : top + tf.size, left : left + tf.size]
            if len(idx) == n:
                out.copy_(crop)
            else:
                out[torch.as_tensor(idx, device=self.device)] = crop
        if not normalize:
            return out.to(torch.uint8)
        return normalize_batch(out, tf)



def normalize_batch(x, tf: EvalTransform):
    """uint8/float (N,3,S,S) in 0..255 -> normalized float32, channels_last."""
    import torch

    x = x.float()
    mean = torch.tensor(tf.mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(tf.std, device=x.device).view(1, 3, 1, 1) * 255
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def read_blobs(path: str, locs: Sequence[tuple[int, int]]) -> list[bytes]:
    """Member bytes at (offset, size) locations of one file, read in order."""
    out = []
    with open(path, "rb") as f:
        for off, size in locs:
            f.seek(off)
            out.append(f.read(size))
    return out


def decode_worker(device: str, threads: int, specs: list[EvalTransform], tasks: Any, results: Any) -> None:
    """A decode process of the GPU path: (id, path, keys, locs) in, uint8 GPU crops out.

    Each process has its own nvJPEG decoder and its own interpreter, so decoding scales
    past torchvision's single locked decoder and never holds the model's GIL. Crops go
    back as CUDA tensors over CUDA IPC (no host round trip).
    """
    import torch

    torch.cuda.set_device(torch.device(device))
    prep = GpuPreprocessor(device, threads)
    sent: list = []  # keep recently sent tensors alive until the consumer has used them
    while True:
        task = tasks.get()
        if task is None:
            break
        bid, path, keys, locs = task
        try:
            blobs = read_blobs(path, locs)
            images, errors = prep.decode(blobs)
            ok = [j for j, e in enumerate(errors) if e is None]
            failed = [(keys[j], errors[j]) for j in range(len(keys)) if errors[j] is not None]
            crops = [prep.prep([images[j] for j in ok], tf, normalize=False) for tf in specs] if ok else []
            torch.cuda.current_stream().synchronize()
            results.put((bid, [keys[j] for j in ok], crops, failed, None))
            sent.append(crops)
            del sent[:-8]
        except Exception as e:  # reported to the driver, which fails the shard loudly
            results.put((bid, None, None, None, f"{type(e).__name__}: {e}"))


class Labeler:
    """One or more teachers (an ensemble averages probabilities) mapped to ``target_space``.

    ``run(batches)`` takes an iterable of ``(keys, file, [(offset, size), ...])`` and yields
    ``(keys_ok, top_indices[N,k] int32, top_probs[N,k] float32, failed: list[(key, error)])``.
    """

    def __init__(self, teachers: Sequence[Teacher], target_space: str, topk: int, device: str = "cpu",
                 compile: bool = False, decode_threads: int = 4, overrides: dict[str, Any] | None = None,
                 precision: str = "fp16", gpu_decode_threads: int = 4, decode_procs: int = 0):
        import torch

        from silverlabel.teachers.labelspace import get_label_space, index_map

        if not teachers:
            raise UserError("at least one teacher")
        self.torch = torch
        self.teachers = list(teachers)
        self.device = torch.device(device)
        self.target = get_label_space(target_space)
        if not 1 <= topk <= len(self.target):
            raise UserError(f"--topk must be in 1..{len(self.target)}, got {topk}")
        self.topk = topk
        self.transforms = [EvalTransform.from_teacher(t, overrides) for t in self.teachers]
        self.maps = []
        for t in self.teachers:
            src = get_label_space(t.label_space)
            if src.name == self.target.name:
                self.maps.append(None)
            else:
                self.maps.append(torch.as_tensor(index_map(src, self.target), device=self.device))
        self.models = []
        if self.device.type == "cpu":
            keep_heap_memory()
        for t in self.teachers:
            m = t.model.to(self.device).eval().to(memory_format=torch.channels_last)
            if self.device.type == "cuda" and compile:
                m = torch.compile(m)
            self.models.append(m)
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.precision = precision
        self.pool = ThreadPoolExecutor(max(1, decode_threads))
        self.gpu_prep = GpuPreprocessor(self.device, gpu_decode_threads) if self.device.type == "cuda" else None
        self.gpu_decode_threads = gpu_decode_threads
        self.decode_procs = decode_procs if self.device.type == "cuda" else 0
        self._workers: list = []
        self._tasks = self._results = None
        self._cpu_tfms = [tf.cpu() for tf in self.transforms] if self.device.type == "cpu" else None

    # -- the shared tail: logits -> probs -> target space -> top-k ---------------------
    def _probs(self, i: int, logits):
        torch = self.torch
        logits = logits.float()
        probs = logits.softmax(-1) if self.teachers[i].activation == "softmax" else logits.sigmoid()
        mapping = self.maps[i]
        if mapping is None:
            return probs
        out = torch.zeros(probs.shape[0], len(self.target), device=probs.device, dtype=probs.dtype)
        keep = mapping >= 0
        out.index_add_(1, mapping[keep], probs[:, keep])
        return out

    def _topk(self, per_teacher: list):
        probs = per_teacher[0] if len(per_teacher) == 1 else sum(per_teacher) / len(per_teacher)
        vals, idx = probs.topk(self.topk, dim=-1, largest=True, sorted=True)
        return idx.to(self.torch.int32), vals.to(self.torch.float32)

    # -- prepared images (reinforce) -----------------------------------------------------
    def classify(self, images: Sequence[Any], embeddings: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Teacher outputs for already-augmented images: ``images[i]`` is a uint8
        ``(N, S_i, S_i, 3)`` array at teacher ``i``'s input size (``self.transforms[i].size``),
        normalized here with the teacher's mean/std (no resize, no crop).

        Returns numpy ``(top indices [N,k] int32, top probs [N,k] float32, embeddings)``;
        ``embeddings`` (with ``embeddings=True``) is float16 ``[N, sum D_i]``: each teacher's
        pre-logits (timm ``forward_head(pre_logits=True)``), concatenated in teacher order.
        Probabilities of an ensemble are averaged in the target space, as in :meth:`run`."""
        torch = self.torch
        cuda = self.device.type == "cuda"
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]
        per_teacher, embs = [], []
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=cuda and self.precision != "fp32"):
            for i, (model, tf) in enumerate(zip(self.models, self.transforms)):
                x = torch.from_numpy(np.ascontiguousarray(images[i]))
                if cuda:
                    x = x.to(self.device)
                x = normalize_batch(x.permute(0, 3, 1, 2), tf)
                if embeddings:
                    pre = model.forward_head(model.forward_features(x), pre_logits=True)
                    logits = model.get_classifier()(pre)
                    embs.append(pre.float())
                else:
                    logits = model(x)
                per_teacher.append(self._probs(i, logits))
            idx, vals = self._topk(per_teacher)
            emb = torch.cat(embs, 1).to(torch.float16).cpu().numpy() if embeddings else None
        return idx.cpu().numpy(), vals.cpu().numpy(), emb

    # -- CPU path -----------------------------------------------------------------------
    def _prep_cpu(self, data: bytes):
        img = decode_rgb(data)
        return [tf(img) for tf in self._cpu_tfms]

    def _run_cpu(self, batches: Iterable[tuple[list[str], str, list[tuple[int, int]]]]):
        torch = self.torch
        for keys, path, locs in batches:
            blobs = read_blobs(path, locs)
            futures = [self.pool.submit(self._prep_cpu, b) for b in blobs]
            ok_keys, tensors, failed = [], [], []
            for key, fut in zip(keys, futures):
                try:
                    tensors.append(fut.result())
                    ok_keys.append(key)
                except Exception as e:
                    failed.append((key, f"{type(e).__name__}: {e}"))
            if not ok_keys:
                yield [], np.zeros((0, self.topk), np.int32), np.zeros((0, self.topk), np.float32), failed
                continue
            with torch.inference_mode():
                per_teacher = []
                for i, model in enumerate(self.models):
                    x = torch.stack([t[i] for t in tensors]).contiguous(memory_format=torch.channels_last)
                    per_teacher.append(self._probs(i, model(x)))
                idx, vals = self._topk(per_teacher)
            yield ok_keys, idx.numpy(), vals.numpy(), failed

    # -- GPU path -----------------------------------------------------------------------
    def _start_workers(self) -> None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        for _ in range(self.decode_procs):
            w = ctx.Process(target=decode_worker, daemon=True,
                            args=(str(self.device), self.gpu_decode_threads, self.transforms, self._tasks, self._results))
            w.start()
            self._workers.append(w)

    def close(self) -> None:
        """Stop the decode worker processes."""
        for _ in self._workers:
            self._tasks.put(None)
        for w in self._workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
        self._workers = []

    def _produce_in_process(self, batches, emit) -> None:
        for keys, path, locs in batches:
            images, errors = self.gpu_prep.decode(read_blobs(path, locs))
            ok = [j for j, e in enumerate(errors) if e is None]
            failed = [(keys[j], errors[j]) for j in range(len(keys)) if errors[j] is not None]
            xs = [self.gpu_prep.prep([images[j] for j in ok], tf) for tf in self.transforms] if ok else []
            emit([keys[j] for j in ok], xs, failed)

    def _produce_with_workers(self, batches, emit) -> None:
        if not self._workers:
            self._start_workers()
        in_flight = 0

        def receive() -> None:
            while True:
                try:
                    bid, keys, crops, failed, error = self._results.get(timeout=5)
                    break
                except queue.Empty:
                    dead = [w for w in self._workers if not w.is_alive()]
                    if dead:
                        self._workers = [w for w in self._workers if w.is_alive()]
                        raise RuntimeError(f"a GPU decode worker died (exit code {dead[0].exitcode})") from None
            if error:
                raise RuntimeError(f"decode worker failed on batch {bid}: {error}")
            xs = [normalize_batch(c, tf) for c, tf in zip(crops, self.transforms)]
            del crops
            emit(keys, xs, failed)

        for bid, (keys, path, locs) in enumerate(batches):
            self._tasks.put((bid, path, keys, locs))
            in_flight += 1
            while in_flight >= 2 * self.decode_procs:
                receive()
                in_flight -= 1
        while in_flight:
            receive()
            in_flight -= 1

    def _run_gpu(self, batches: Iterable[tuple[list[str], str, list[tuple[int, int]]]]):
        torch = self.torch
        prep_stream = torch.cuda.Stream(self.device)
        q: queue.Queue = queue.Queue(maxsize=3)
        stop = object()

        def emit(keys, xs, failed):
            ev = torch.cuda.Event()
            ev.record(prep_stream)
            q.put((keys, xs, failed, ev))

        def producer():
            try:
                with torch.cuda.stream(prep_stream):
                    if self.decode_procs:
                        self._produce_with_workers(batches, emit)
                    else:
                        self._produce_in_process(batches, emit)
            except BaseException as e:  # surface errors in the consumer
                q.put(e)
                return
            q.put(stop)

        th = threading.Thread(target=producer, daemon=True)
        th.start()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]
        pending = None  # (keys, idx_host, val_host, failed, event) of the previous batch
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            if item is stop:
                break
            keys, xs, failed, ev = item
            torch.cuda.current_stream(self.device).wait_event(ev)
            if keys:
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=self.precision != "fp32"):
                    per_teacher = [self._probs(i, m(xs[i])) for i, m in enumerate(self.models)]
                    idx, vals = self._topk(per_teacher)
                idx_h = torch.empty(idx.shape, dtype=idx.dtype, pin_memory=True)
                val_h = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
                idx_h.copy_(idx, non_blocking=True)
                val_h.copy_(vals, non_blocking=True)
            else:
                idx_h = torch.zeros((0, self.topk), dtype=torch.int32)
                val_h = torch.zeros((0, self.topk), dtype=torch.float32)
            done = torch.cuda.Event()
            done.record()
            del xs
            # hand back the previous batch while this one computes
            if pending is not None:
                pending[4].synchronize()
                yield pending[0], pending[1].numpy(), pending[2].numpy(), pending[3]
            pending = (keys, idx_h, val_h, failed, done)
        if pending is not None:
            pending[4].synchronize()
            yield pending[0], pending[1].numpy(), pending[2].numpy(), pending[3]
        th.join()

    def run(self, batches: Iterable[tuple[list[str], str, list[tuple[int, int]]]]
            ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list]]:
        """Label batches ``(keys, file, [(offset, size), ...])`` of JPEG members.

        With decode workers, batches can come back out of order: order rows by key."""
        if self.device.type == "cuda":
            yield from self._run_gpu(batches)
        else:
            yield from self._run_cpu(batches)


def keep_heap_memory() -> None:
    """Stop glibc from returning large blocks to the OS after every forward pass.

    CPU inference frees and re-allocates tens of MB of activations per batch; with glibc's
    defaults each of those is a fresh mmap that the kernel must zero and fault in again
    (measured: 2.8M page faults, ~40% of the time in the kernel, EfficientNet-Lite0 at
    60 img/s on 2 cores; with this, 115 img/s). No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, ctypes.c_int(2**31 - 1))  # M_TRIM_THRESHOLD
        libc.mallopt(-3, ctypes.c_int(2**31 - 1))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
