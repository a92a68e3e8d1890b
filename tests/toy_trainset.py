"""A tiny training set in the layout `silverlabel shard` writes, for loader/train/eval tests.

Tars ``{name}-{split}-{index:04d}.tar`` with ``.jpg``/``.cls``/``.json`` members next to
``_info.json`` (timm's format) and, optionally, ``classes.json``. What each sample carries
is up to the caller: ``sample(i, split, width, height) -> (cls, json_meta)``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from silverlabel.demodata import photo_like_images
from silverlabel.formats.wds import ShardWriter

Sample = Callable[[int, str, int, int], tuple[int, dict[str, Any]]]


def write_toy_trainset(root: Path, splits: dict[str, list[int]], sample: Sample, *, size: tuple[int, int],
                       seed: int, classes: dict[str, Any] | None = None, name: str = "toy") -> Path:
    """Write the shards of every split (keys ``s00000``, ``s00001``, ... across splits)."""
    total = sum(sum(lengths) for lengths in splits.values())
    images = list(photo_like_images(total, size=size, seed=seed))
    root.mkdir(parents=True, exist_ok=True)
    info, i = {}, 0
    for split, lengths in splits.items():
        files = []
        for s, n in enumerate(lengths):
            tar = f"{name}-{split}-{s:04d}.tar"
            with open(root / tar, "wb") as f, ShardWriter(f) as w:
                for _ in range(n):
                    data = images[i][1]
                    im = Image.open(io.BytesIO(data))
                    cls, meta = sample(i, split, im.width, im.height)
                    w.write(f"s{i:05d}", {"jpg": data, "cls": str(cls).encode(), "json": json.dumps(meta).encode()})
                    i += 1
            files.append(tar)
        info[split] = {"name": split, "num_samples": sum(lengths), "filenames": files, "shard_lengths": list(lengths)}
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    (root / "_info.json").write_text(json.dumps({"name": name, "splits": info}))
    return root
