"""The README's Python example runs as written, on a folder of real photos."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import skimage.data
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page", "text", "cat"]


def _python_block(section: str) -> str:
    text = README.read_text()
    part = text[text.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def test_python_api_example_runs(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(PHOTOS * 3):  # 30 photos, a few crops of each
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        w, h = img.size
        img.crop((i % 3 * w // 10, 0, w, h)).save(photos / f"{name}-{i}.jpg", quality=90)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_python_block("Python API"), str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["pool"].counts == {"success": 30}
    sel = scope["sel"]
    assert sel.classes <= 3 and sel.rows == pq.read_table("data/sel/selection").num_rows > 0
    assert os.path.isfile("data/trainset/_info.json")
