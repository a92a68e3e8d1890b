"""Training losses, one registry (``silverlabel train --loss NAME``).

A loss is a function ``fn(logits, batch, cfg) -> scalar float32 tensor`` registered with what
its targets are, which decides the head size and what the loader reads:

- ``targets="class"``: the sample's ``cls`` (head: ``num_classes`` of ``classes.json``);
- ``targets="topk"``: the teacher's top-k ``labels``/``label_probs`` (head: the label space);
- ``targets="reinforced"``: a stored augmentation and its teacher top-k (head: the reinforce
  label space); the loader replays the augmentation.

``batch`` holds ``cls`` (int64 ``[B]``, -1: none), ``labels`` (int64 ``[B, k]``, -1: padding) and
``probs`` (float ``[B, k]``); ``cfg`` is the :class:`~silverlabel.stages.train.TrainConfig`.

    >>> loss_names()
    ['ce', 'bce-multihot', 'soft-topk', 'kd']
    >>> get_loss("kd").targets
    'reinforced'

A new loss: a function decorated with ``@register_loss("name", targets=...)`` in a module
named in :data:`LOSS_MODULES` (one line). Torch is imported inside the functions, so listing
the names (``--help``) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from silverlabel.errors import UserError
from silverlabel.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

TARGETS = ("class", "topk", "reinforced")
#: Modules that register losses besides this one.
LOSS_MODULES: tuple[str, ...] = ()


class Batch(NamedTuple):
    cls: Any
    labels: Any
    probs: Any


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[Any, Batch, Any], Any]
    targets: str
    help: str = ""
    #: called on a freshly created model before training (e.g. a bias init)
    init_head: Callable[[Any], None] | None = None

    def __call__(self, logits: torch.Tensor, batch: Batch, cfg: Any) -> torch.Tensor:
        return self.fn(logits.float(), batch, cfg)


#: name -> :class:`Loss`, in registration order
LOSSES = Registry("loss", LOSS_MODULES)


def register_loss(name: str, *, targets: str, help: str = "", init_head: Callable[[Any], None] | None = None
                  ) -> Callable:
    """Decorator: ``@register_loss("ce", targets="class")`` on ``fn(logits, batch, cfg)``."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, not {targets!r}")
    return LOSSES.register(name, lambda fn: Loss(name, fn, targets, help, init_head))


def loss_names() -> list[str]:
    """The registered losses (``--loss`` choices)."""
    return LOSSES.names()


def get_loss(name: str) -> Loss:
    return LOSSES.lookup(name)


# ---------------------------------------------------------------------------------------
# the built-in losses


def _topk(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, clamped indices) of the top-k labels, checked against the head size."""
    if int(batch.labels.max()) >= logits.shape[1]:
        raise UserError(f"label index {int(batch.labels.max())} >= head size {logits.shape[1]}; "
                        "set --label-space-classes")
    return batch.labels >= 0, batch.labels.clamp(min=0)


@register_loss("ce", targets="class", help="cross-entropy on the class (label smoothing applies)")
def cross_entropy(logits: torch.Tensor, batch: Batch, cfg: Any) -> torch.Tensor:
    import torch.nn.functional as F

    if int(batch.cls.max()) >= logits.shape[1]:
        raise UserError(f"class index {int(batch.cls.max())} >= num_classes {logits.shape[1]}")
    return F.cross_entropy(logits, batch.cls, ignore_index=-1, label_smoothing=cfg.label_smoothing)


def _bce_head_init(model: Any) -> None:
    import torch

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear) and head.bias is not None:
        torch.nn.init.constant_(head.bias, -10.0)  # COYO-ViT: start from "no class present"


@register_loss("bce-multihot", targets="topk", init_head=_bce_head_init,
               help="sigmoid BCE against a multi-hot of the top-k labels (>= --label-threshold)")
def bce_multihot(logits: torch.Tensor, batch: Batch, cfg: Any) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    valid, idx = _topk(logits, batch)
    keep = valid if cfg.label_threshold is None else valid & (batch.probs >= cfg.label_threshold)
    target = torch.zeros_like(logits)
    target.scatter_reduce_(1, idx, keep.to(logits.dtype), reduce="amax")  # padding (0 at index 0) never clears a 1
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


@register_loss("soft-topk", targets="topk", help="cross-entropy to the renormalised top-k probabilities")
def soft_topk(logits: torch.Tensor, batch: Batch, cfg: Any) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    valid, idx = _topk(logits, batch)
    p = torch.where(valid, batch.probs, torch.zeros_like(batch.probs)).clamp(min=0)
    mass = p.sum(1, keepdim=True)
    rows = (mass.squeeze(1) > 0).to(logits.dtype)
    p = p / mass.clamp(min=1e-12)
    logp = F.log_softmax(logits, dim=1)
    ce = -(p * logp.gather(1, idx)).sum(1)
    if cfg.label_smoothing > 0:
        ce = (1 - cfg.label_smoothing) * ce - cfg.label_smoothing * logp.mean(1)
    return (ce * rows).sum() / rows.sum().clamp(min=1)


def kd_target(labels: torch.Tensor, probs: torch.Tensor, num_classes: int, valid: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Dense teacher distribution from sparse top-k ("smooth", as ImageNet+): the stored
    probabilities at their classes, the leftover mass ``1 - sum`` spread uniformly over the
    other ``num_classes - k`` classes. Padding (``-1``) carries nothing."""
    import torch

    valid = labels >= 0 if valid is None else valid
    idx = labels.clamp(min=0)
    p = torch.where(valid, probs.float(), torch.zeros_like(probs, dtype=torch.float32)).clamp(min=0)
    hit = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    hit.scatter_reduce_(1, idx, valid.float(), reduce="amax")
    dense = torch.zeros_like(hit).scatter_add_(1, idx, p)
    rest = (1.0 - p.sum(1, keepdim=True)).clamp(min=0) / (num_classes - hit.sum(1, keepdim=True)).clamp(min=1)
    return torch.where(hit > 0, dense, rest.expand_as(dense))


def kd_loss(logits: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), averaged over the batch; teacher = :func:`kd_target`."""
    import torch
    import torch.nn.functional as F

    t = kd_target(labels, probs, logits.shape[1], valid)
    logp = F.log_softmax(logits.float(), dim=1)
    return (torch.xlogy(t, t) - t * logp).sum(1).mean()


@register_loss("kd", targets="reinforced",
               help="distil from the stored teacher outputs of a silverlabel reinforce output")
def knowledge_distillation(logits: torch.Tensor, batch: Batch, cfg: Any) -> torch.Tensor:
    valid, idx = _topk(logits, batch)
    return kd_loss(logits, idx, batch.probs, valid)
