"""silverlabel: web images -> machine-labeled, ImageNet-like pretraining datasets.

Stages (``silverlabel --help``): ingest, label, select, shard, reinforce, train, eval, card.
Each is a function of one config dataclass, importable from here::

    >>> from silverlabel import LabelConfig, run_label
    >>> LabelConfig("data/pool").topk
    50
    >>> run_label(LabelConfig("data/pool", limit=500))  # doctest: +SKIP

The names load on first use (module ``__getattr__``): ``import silverlabel`` itself imports
neither torch nor any stage.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.12.0"

#: stage module -> the prefix of its names: ``IngestConfig`` and ``run_ingest`` for ``ingest``
_STAGES = {"ingest": "Ingest", "label": "Label", "select": "Select", "shard": "Shard", "reinforce": "Reinforce",
           "train": "Train", "evaluate": "Eval", "lowshot": "LowShot", "card": "Card"}
#: public name -> the module that defines it
_EXPORTS = {
    **{f"{prefix}Config": f"silverlabel.stages.{module}" for module, prefix in _STAGES.items()},
    **{f"run_{prefix.lower()}": f"silverlabel.stages.{module}" for module, prefix in _STAGES.items()},
    "ImageConfig": "silverlabel.imageops", "FetchConfig": "silverlabel.sources.http",
    "SourceOptions": "silverlabel.sources", "AugPolicy": "silverlabel.augment",
    "TeacherSpec": "silverlabel.teachers", "UserError": "silverlabel.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'silverlabel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
