"""Which device a stage runs on: the one place that turns ``--device`` into a torch device.

``auto`` means the GPU when one is visible, else the CPU; naming ``cuda`` on a machine
without one is a one-line error. A pool of worker processes (one per GPU) spreads over the
GPUs by worker number; a DDP rank takes its local rank's GPU.

    >>> resolve_device("cpu")
    'cpu'
    >>> torch_device("cpu").type
    'cpu'
"""

from __future__ import annotations

from typing import Any

from silverlabel.errors import UserError


def resolve_device(device: str, index: int | None = None) -> str:
    """``auto`` -> ``cuda`` (``cuda:index`` when given) when a GPU is visible, else ``cpu``;
    a named CUDA device without a visible GPU is a UserError."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return "cuda" if index is None else f"cuda:{index}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible")
        if device == "cuda" and index is not None:
            return f"cuda:{index}"
    return device


def torch_device(device: str, index: int | None = None) -> Any:
    """:func:`resolve_device` as a ``torch.device``."""
    import torch

    return torch.device(resolve_device(device, index))


def worker_device(device: str) -> str:
    """The device of this worker process: with several GPUs, pool worker k uses GPU k (mod
    the count), so ``--workers N`` on an N-GPU machine puts one worker on each GPU. That GPU
    becomes the process's current device (streams, CUDA graphs and libraries follow it)."""
    import multiprocessing as mp

    device = resolve_device(device)
    if device == "cuda":
        import torch

        ident = mp.current_process()._identity
        index = (ident[0] - 1) % torch.cuda.device_count() if ident and torch.cuda.device_count() > 1 else 0
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return device
