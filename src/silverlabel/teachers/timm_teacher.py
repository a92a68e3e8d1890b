"""Any timm model as a teacher: ``--teacher timm:NAME [--checkpoint PATH]``.

Checkpoints are safetensors or PyTorch files read with ``weights_only=True`` (no pickled
objects are ever executed). Without a checkpoint, timm's pretrained weights are fetched
from the hub, which needs a network. Preprocessing comes from the model's pretrained
config; the native label space from its class count (1000 -> in1k, 11821 -> in12k,
21841 -> in21k) unless ``--teacher-space`` says otherwise.
"""

from __future__ import annotations

import os
from typing import Any

from silverlabel.errors import UserError
from silverlabel.teachers import SPACE_BY_CLASSES, Teacher, TeacherSpec


def load_checkpoint_tensors(path: str) -> dict[str, Any]:
    """A flat name -> tensor dict from a .safetensors or .pth/.pt/.bin file (weights only)."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def create_timm_teacher(spec: TeacherSpec) -> Teacher:
    import timm

    name = spec.model_name
    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r} (see timm.list_models())")
    if spec.checkpoint:
        tensors = load_checkpoint_tensors(spec.checkpoint)
        head = _head_classes(tensors)
        model = timm.create_model(name, pretrained=False, num_classes=head or 1000)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{spec.checkpoint}: does not fit {name}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
            )
    else:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:
            raise UserError(
                f"could not fetch pretrained weights for {name} ({type(e).__name__}); offline? pass --checkpoint PATH"
            ) from None
    model.eval()
    classes = model.num_classes
    space = spec.label_space or SPACE_BY_CLASSES.get(classes)
    if space is None:
        raise UserError(f"{name} has {classes} classes: say which label space with --teacher-space in1k|in12k|in21k")
    return Teacher(
        name=name,
        model=model,
        data_config=timm.data.resolve_model_data_config(model),
        label_space=space,
        activation="softmax",
        meta={"architecture": name, "weights": spec.checkpoint or "timm pretrained"},
    )


def _head_classes(tensors: dict[str, Any]) -> int | None:
    for key in ("head.fc.weight", "head.weight", "classifier.weight", "fc.weight", "head.fc.bias", "classifier.bias"):
        if key in tensors:
            return int(tensors[key].shape[0])
    return None
