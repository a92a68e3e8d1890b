"""silverlabel eval: accuracy of a trained run on a split of a training set.

Loads ``RUN/checkpoint-final.pt`` (else ``RUN/checkpoint.pt``; or RUN may be a ``.pt`` file)
with ``torch.load(weights_only=True)``, rebuilds the model with
:func:`silverlabel.stages.train.create_model` from the stored config (``ema=True``: the EMA
weights when the checkpoint has them), and runs it over ``split`` with the loader in eval
mode (center crop, file order, no sample dropped). Reports:

- ``top1`` / ``top5``: accuracy on each sample's ``cls`` (samples with ``cls == -1`` skipped);
- ``per_class``: top-1 accuracy per class present in the split (names from
  ``TRAINSET/classes.json``, else from the target label space);
- ``real`` (with ``real_labels``): ReaL-style accuracy, as timm's ``real_labels.py``: a
  prediction is right when it is in the sample's set of valid classes; samples with an
  empty (or no) set are left out. The file is a JSON list of lists (by position in the
  split's order) or a dict ``{sample key: [class, ...]}``.

``head_space`` / ``target_space`` (e.g. ``in21k`` -> ``in1k``): the head's probabilities
(softmax; sigmoid for a ``bce-multihot`` run) are scatter-added into the target space with
``index_map(head, target, policy="drop")`` (head classes absent from the target are
dropped) before the top-k is taken; ``cls`` and label sets are then target indices.

RUN, TRAINSET, ``--real-labels`` and ``--out`` may be URLs of any fsspec store (issue 16):
the checkpoint is read from its staged copy (:func:`silverlabel.dataset.fetch_local`), the
training set streams through the loader, and the report is uploaded as it closes
(:func:`silverlabel.dataset.atomic_write`); it names the run, checkpoint and training set by
the same ids as on disk.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from silverlabel.dataset import (Run, TrainSet, check_target, check_writable, dataset_identity, display, fetch_local,
                                 input_name, is_file, local_target, read_bytes, url_of, write_json_atomic)
from silverlabel.devices import torch_device
from silverlabel.engine import Report
from silverlabel.errors import UserError
from silverlabel.options import device_field, opt, positive_int
from silverlabel.loader import LoaderConfig, create_loader, normalize_on
from silverlabel.log import set_total


@dataclass(frozen=True)
class EvalConfig:
    run: str = opt(help="run folder (silverlabel train -o) or a checkpoint file", positional=True, metavar="RUN")
    trainset: str = opt(help="training set folder (silverlabel shard)", flag="--data", metavar="TRAINSET",
                        required=True)
    split: str = opt("validation", "split to evaluate")
    batch_size: int = opt(64, "batch size", type=positive_int)
    ema: bool = opt(False, "use the EMA weights when the checkpoint has them", action="store_true")
    device: str = device_field()  # auto | cpu | cuda | cuda:N
    real_labels: str | None = opt(None, "JSON list of lists (split order) or {key: [classes]}: ReaL-style "
                                  "multi-label accuracy", metavar="FILE")
    head_space: str | None = opt(None, "label space of the model's head (e.g. in21k)", metavar="SPACE")
    target_space: str | None = opt(None, "label space of the labels (e.g. in1k)", metavar="SPACE")
    out: str | None = opt(None, "JSON report", metavar="FILE", default_help="default RUN/eval-SPLIT.json")
    num_workers: int = opt(0, "loader worker processes", flag="--workers", type=int)
    ks: tuple[int, ...] = (1, 5)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {self.num_workers}")
        if (self.head_space is None) != (self.target_space is None):
            raise UserError("--head-space and --target-space go together")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UserError(f"ks must be >= 1, got {self.ks}")


# ---------------------------------------------------------------------------------------
# pure helpers


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> tuple[dict[int, int], int]:
    """``({k: number of labeled rows whose target is in the top k}, number of labeled rows)``;
    rows with ``target == -1`` are skipped. ``k`` larger than the class count counts as all."""
    targets = targets.reshape(-1).to(scores.device)
    keep = targets >= 0
    scores, targets = scores[keep], targets[keep]
    n = int(targets.numel())
    if n == 0:
        return {k: 0 for k in ks}, 0
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == targets[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}, n


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """``{k: top-k accuracy}`` over rows with ``target >= 0`` (NaN when there are none)."""
    correct, n = topk_correct(logits, targets, ks)
    return {k: (correct[k] / n if n else math.nan) for k in ks}


def real_correct(preds: Any, label_sets: Sequence[Sequence[int] | None]) -> tuple[int, int]:
    """``(right, counted)``: ``preds`` is one class per sample (top-1) or a row of classes per
    sample (top-k: right when any is in the set); samples with an empty/None set are left out."""
    if isinstance(preds, torch.Tensor):
        preds = preds.tolist()
    if len(preds) != len(label_sets):
        raise UserError(f"{len(preds)} predictions for {len(label_sets)} label sets")
    right = counted = 0
    for p, s in zip(preds, label_sets):
        if not s:
            continue
        counted += 1
        ps = p if isinstance(p, (list, tuple)) else [p]
        valid = {int(x) for x in s}
        right += any(int(x) in valid for x in ps)
    return right, counted


def real_accuracy(pred_top1: Any, label_sets: Sequence[Sequence[int] | None]) -> float:
    """ReaL accuracy: the share of samples with a non-empty label set whose prediction is in
    that set (NaN when no sample has one)."""
    right, counted = real_correct(pred_top1, label_sets)
    return right / counted if counted else math.nan


def map_scores(probs: torch.Tensor, head_space: str, target_space: str) -> torch.Tensor:
    """Scatter-add head-space probabilities ``(N, len(head))`` into ``target_space``
    (``index_map(..., policy="drop")``: head classes absent from the target are dropped)."""
    from silverlabel.teachers.labelspace import get_label_space, index_map, map_probs

    head = get_label_space(head_space)
    if probs.shape[-1] != len(head):
        raise UserError(f"the head has {probs.shape[-1]} classes, label space {head_space!r} has {len(head)}")
    return map_probs(probs, index_map(head, target_space, policy="drop"))


# ---------------------------------------------------------------------------------------
# pieces


def load_model(path: Path, ema: bool = False) -> tuple[torch.nn.Module, dict[str, Any], str, int]:
    """``(model in eval mode on CPU, checkpoint's train config dict, "ema" | "model", step)``."""
    from silverlabel.stages.train import TrainConfig, create_model, load_weights

    ck = load_weights(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or not isinstance(ck.get("config"), dict):
        raise UserError(f"{display(path)}: not a silverlabel train checkpoint (needs model, config)")
    conf = dict(ck["config"])
    fields = set(TrainConfig.__dataclass_fields__)
    tcfg = TrainConfig(**{"output": "-", **{k: v for k, v in conf.items() if k in fields}})  # stored without one
    if not ck.get("num_classes"):
        raise UserError(f"{display(path)}: checkpoint has no num_classes")
    num_classes = int(ck["num_classes"])
    model = create_model(tcfg, num_classes)
    which = "model"
    state = ck["model"]
    if ema and isinstance(ck.get("ema"), dict):
        state, which = ck["ema"], "ema"
    model.load_state_dict(state)
    model.eval()
    return model, conf, which, int(ck.get("step") or 0)


def load_label_sets(path: str, keys: list[str]) -> list[list[int]]:
    """One label set per sample of the split, in split order (``[]``: none)."""
    try:
        doc = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"--real-labels: no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--real-labels {path}: not valid JSON ({e})") from e
    if isinstance(doc, list):
        if len(doc) != len(keys):
            raise UserError(f"--real-labels {path}: {len(doc)} label sets for {len(keys)} samples in the split")
        sets = doc
    elif isinstance(doc, dict):
        sets = [doc.get(k) or [] for k in keys]
        if keys and not any(k in doc for k in keys):
            raise UserError(f"--real-labels {path}: no key matches a sample key of the split (e.g. {keys[0]!r})")
    else:
        raise UserError(f"--real-labels {path}: want a JSON list of lists or an object key -> list")
    try:
        return [[int(x) for x in (s or [])] for s in sets]
    except (TypeError, ValueError) as e:
        raise UserError(f"--real-labels {path}: label sets must be lists of class indices ({e})") from e


def class_names(trainset: str, n: int, target_space: str | None) -> list[str]:
    names = [str(i) for i in range(n)]
    if target_space is not None:
        from silverlabel.teachers.labelspace import get_label_space

        sp = get_label_space(target_space)
        names[: len(sp)] = list(sp.names)[:n]
    for c in TrainSet(trainset).read_classes().get("classes") or []:
        if isinstance(c, dict) and isinstance(c.get("cls"), int) and 0 <= c["cls"] < n:
            names[c["cls"]] = str(c.get("name") or c.get("wnid") or c["cls"])
    return names


# ---------------------------------------------------------------------------------------
# the run


def find_checkpoint(run: str | os.PathLike) -> Path:
    """The checkpoint a run names (:meth:`silverlabel.dataset.Run.find_checkpoint`: the final
    one, else the latest; ``run`` may be a ``.pt`` file). A run at a URL: the staging path
    naming the object (asked of the store; read it with :func:`~silverlabel.dataset.fetch_local`)."""
    u = url_of(run)
    if u is None:
        return Run(run).find_checkpoint()
    root = local_target(u)
    if root.suffix == ".pt" and is_file(root):
        return root
    r = Run(root)
    for p in (r.final_checkpoint_path, r.checkpoint_path):
        if is_file(p):
            return p
    raise FileNotFoundError(f"{display(u)}: no {r.final_checkpoint_path.name} or {r.checkpoint_path.name} there")


def run_folder(run: str | os.PathLike, ckpt: Path) -> Path:
    """Where a run's reports go: the run folder (a staging path for a URL), or the folder of
    the ``.pt`` file given."""
    if url_of(run) is None:
        return Run(run).folder
    return ckpt.parent if ckpt == local_target(run) else local_target(run)


def run_name(run: str | os.PathLike, ckpt: Path) -> str:
    """A run's id (``run@sha256:...``) as its checkpoint records it, the same on disk and at a
    URL (:func:`silverlabel.dataset.dataset_identity`); a checkpoint without one is named by
    its file name and bytes."""
    if url_of(run) is None:
        return dataset_identity(run)
    local = fetch_local(ckpt)  # already staged by load_model: not read again
    try:
        ck = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, or one with objects: named by its bytes
        ck = None
    if isinstance(ck, dict) and isinstance(ck.get("id"), str) and ck["id"].startswith("run@"):
        return ck["id"]
    return input_name(local)


def run_eval(cfg: EvalConfig, progress: Report | None = None) -> dict[str, Any]:
    """Evaluate (see the module docstring); writes the JSON report and returns it.
    ``progress``: told the split's size (:func:`silverlabel.log.set_total`), then
    ``progress(images, images)`` per batch (a :class:`silverlabel.log.Progress` draws a bar)."""
    t0 = time.monotonic()
    if cfg.out is not None:
        check_writable(cfg.out, "--out")
        if url_of(cfg.out) is None:
            check_target(cfg.out, "--out", folder=False)
    ckpt = find_checkpoint(cfg.run)
    split = TrainSet(cfg.trainset).split(cfg.split)
    num_samples = int(split.get("num_samples", sum(split["shard_lengths"])))  # read_info: never missing
    if cfg.head_space is not None:
        from silverlabel.teachers.labelspace import get_label_space

        get_label_space(cfg.head_space), get_label_space(cfg.target_space)  # fail early on bad names

    model, tconf, which, step = load_model(ckpt, cfg.ema)
    device = torch_device(cfg.device)
    model.to(device)
    img_size = int(tconf.get("img_size", 224))
    sigmoid = tconf.get("loss") == "bce-multihot"
    lcfg = LoaderConfig(cfg.trainset, split=cfg.split, batch_size=cfg.batch_size, img_size=img_size, train=False,
                        drop_last=False, return_keys=True, num_workers=cfg.num_workers, normalize=device.type != "cuda")

    ks = tuple(sorted(set(cfg.ks)))
    kmax = max(ks)
    correct = {k: 0 for k in ks}
    labeled = seen = 0
    per_count: dict[int, int] = {}
    per_right: dict[int, int] = {}
    keys: list[str] = []
    tops: list[torch.Tensor] = []
    num_out = None
    set_total(progress, num_samples)
    with torch.inference_mode():
        for x, cls, _labels, _probs, bkeys in create_loader(lcfg, pin_memory=device.type == "cuda"):
            logits = model(normalize_on(x.to(device, non_blocking=True), lcfg)).float()
            if cfg.head_space is not None:
                probs = logits.sigmoid() if sigmoid else logits.softmax(dim=1)
                scores = map_scores(probs, cfg.head_space, cfg.target_space)
            else:
                scores = logits
            num_out = scores.shape[1]
            if int(cls.max()) >= num_out:
                raise UserError(f"class index {int(cls.max())} >= the {num_out} classes the model predicts"
                                 + ("" if cfg.head_space else "; pass --head-space/--target-space?"))
            c, n = topk_correct(scores, cls, ks)
            for k in ks:
                correct[k] += c[k]
            labeled += n
            top = scores.topk(min(kmax, num_out), dim=1).indices.cpu()
            tops.append(top)
            hit1 = top[:, 0] == cls
            for ci, h in zip(cls.tolist(), hit1.tolist()):
                if ci >= 0:
                    per_count[ci] = per_count.get(ci, 0) + 1
                    per_right[ci] = per_right.get(ci, 0) + int(h)
            keys.extend(bkeys)
            seen += len(bkeys)
            if progress is not None:
                progress(len(bkeys), len(bkeys))
    if seen != num_samples:
        raise UserError(f"{display(cfg.trainset)}: split {cfg.split!r} yielded {seen} samples, "
                         f"_info.json says {num_samples}")

    real = None
    if cfg.real_labels is not None:
        sets = load_label_sets(cfg.real_labels, keys)
        top = torch.cat(tops) if tops else torch.zeros(0, 1, dtype=torch.int64)
        r1, counted = real_correct(top[:, 0], sets)
        real = {"count": counted, "top1": r1 / counted if counted else None}
        if kmax >= 5:
            r5, _ = real_correct(top[:, :5].tolist(), sets)
            real["top5"] = r5 / counted if counted else None

    names = class_names(cfg.trainset, max([num_out or 0, *[c + 1 for c in per_count]]), cfg.target_space)
    per_class = [{"cls": c, "name": names[c], "count": per_count[c], "correct": per_right[c],
                  "top1": per_right[c] / per_count[c]} for c in sorted(per_count)]
    acc = {k: (correct[k] / labeled if labeled else None) for k in ks}
    report: dict[str, Any] = {
        "run": run_name(cfg.run, ckpt), "checkpoint": input_name(fetch_local(ckpt)), "weights": which, "step": step,
        "model": tconf.get("model"), "trainset": dataset_identity(cfg.trainset), "split": cfg.split, "img_size": img_size,
        "head_space": cfg.head_space, "target_space": cfg.target_space,
        "counts": {"samples": seen, "labeled": labeled, "real": real["count"] if real else None},
        **{f"top{k}": acc[k] for k in ks},
        "real": real,
        "per_class": per_class,
        "seconds": round(time.monotonic() - t0, 3),
    }
    out = local_target(cfg.out) if cfg.out else run_folder(cfg.run, ckpt) / f"eval-{cfg.split}.json"
    write_json_atomic(out, report)  # inputs by their ids; where they are on this machine only in what is returned
    report["output"] = display(out)
    report["paths"] = {"run": display(cfg.run), "checkpoint": display(ckpt), "trainset": display(cfg.trainset)}
    return report


def format_report(r: dict[str, Any], max_classes: int = 50) -> str:
    """A readable table of an eval report."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:6.2f}%"

    where = r.get("paths") or r  # the local paths of a report just made, else the ids it records
    lines = [f"silverlabel eval: {where['checkpoint']} ({r['weights']} weights, step {r['step']}) on "
             f"{where['trainset']} [{r['split']}]"]
    if r.get("head_space"):
        lines.append(f"  head {r['head_space']} -> target {r['target_space']}")
    c = r["counts"]
    lines.append(f"  samples {c['samples']}, labeled {c['labeled']}")
    for k in (1, 5):
        if f"top{k}" in r:
            lines.append(f"  top-{k} accuracy   {pct(r[f'top{k}'])}")
    if r.get("real"):
        lines.append(f"  ReaL top-1        {pct(r['real']['top1'])}  (over {r['real']['count']} samples with a label set)")
        if "top5" in r["real"]:
            lines.append(f"  ReaL top-5        {pct(r['real']['top5'])}")
    pc = r["per_class"]
    if pc:
        lines.append("")
        lines.append(f"  {'cls':>6}  {'count':>7}  {'top-1':>7}  name")
        rows = sorted(pc, key=lambda d: (d["top1"], d["cls"])) if len(pc) > max_classes else pc
        for d in rows[:max_classes]:
            lines.append(f"  {d['cls']:>6}  {d['count']:>7}  {pct(d['top1'])}  {d['name']}")
        if len(pc) > max_classes:
            lines.append(f"  ... {len(pc) - max_classes} more classes (the {max_classes} worst shown; all in the JSON)")
    lines.append(f"\n  report: {r.get('output')}")
    return "\n".join(lines)
