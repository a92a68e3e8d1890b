"""Low-shot evaluation: how good is a pretrained student with 1% / 10% of the labels?

The imagenet2012_subset protocol (SimCLR, tfds): from the ``train`` split of a labeled
training set, take a label-balanced subset of ``floor(fraction * N)`` samples (1% of
ImageNet-1k = 12,811 images, 10% = 128,116), then

- **probe**: freeze the pretrained model, extract its pre-logits features (``forward_features``
  then ``forward_head(pre_logits=True)``) with the eval transform (resize + center crop), fit a
  multinomial logistic regression (L-BFGS, features standardised on the subset) with the L2
  strength chosen on a held-out fifth of the subset, refit on the whole subset;
- **finetune**: copy the subset into a small training set (members byte for byte), fine-tune
  the whole model from the checkpoint with a new head (``silverlabel train --init``, loss
  ``ce``) for ``ft_steps`` steps;

both from the same weights (the EMA ones with ``ema=True``), saved without the head as
``init.pt``; ``img_size`` other than the run's resamples the position embeddings for both;

and report top-1/top-5 of each on the **full** validation split.

The subset is the one ``silverlabel select --fraction F --balanced --seed S`` draws: per-class
quotas from :func:`silverlabel.stages.select.balanced_quotas` and, within a class, the
samples with the smallest ``md5("{seed}:f:{key}")``. So a subset can be reproduced with
``select`` and shared as a key list.

    >>> cfg = LowShotConfig("runs/vit-s", "data/in1k-trainset", fractions=(0.01, 0.1))  # doctest: +SKIP
    >>> report = run_lowshot(cfg)                                                      # doctest: +SKIP

Outputs under ``RUN/lowshot`` (or ``out``): ``lowshot.json``, ``subset-F/`` (the fine-tuning
training sets), ``finetune-F/`` (their runs, with ``eval-SPLIT.json``). Rerunning reuses the
subsets, and resumes a fine-tuning run only when its weights, subset and settings are the
same (``finetune-F/lowshot-run.json``); otherwise it starts it again.

RUN, TRAINSET and ``out`` may be URLs of any fsspec store (issue 16): samples are read by
range (:func:`silverlabel.dataset.open_read`), and everything under ``out`` is written in this
process's staging folder and uploaded as it closes (the fine-tuning runs as ``train`` uploads
a run); a stale fine-tune there is deleted object by object.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from silverlabel.dataset import (Run, TrainSet, atomic_write, check_target, check_writable, dataset_identity, display,
                                 fetch_local, input_name, is_file, local_target, open_read, read_bytes, remove, url_of,
                                 write_json_atomic)
from silverlabel.devices import torch_device
from silverlabel.errors import UserError
from silverlabel.options import opt, positive_int
from silverlabel.formats.wds import ShardWriter, iter_tar_samples, read_member
from silverlabel.loader import LoaderConfig, decode_image, to_tensor
from silverlabel.loader import INDEX_READ_AHEAD
from silverlabel.stages.evaluate import find_checkpoint, load_model, run_folder, run_name
from silverlabel.stages.select import balanced_quotas

MODES = ("probe", "finetune")
_GROUP = "low-shot (imagenet2012_subset protocol)"
SUBSET_SHARD_SIZE = 1000
STAMP_FILE = "lowshot-run.json"


@dataclass(frozen=True)
class LowShotConfig:
    # the fields eval shares (their flags and help: EvalConfig's)
    run: str = opt(positional=True)  # pretrained run folder (or checkpoint file)
    trainset: str = opt(flag="--data")  # labeled training set (silverlabel shard) with train and validation splits
    fractions: tuple[float, ...] = opt(
        (0.01, 0.1), "instead of evaluating the head: label-balanced subsets of these fractions of --train-split "
        "(0.01 0.1 = ImageNet's 1%%/10%%), a linear probe on frozen features and/or a short fine-tune on each, "
        "accuracy on the whole --split; writes RUN/lowshot/lowshot.json (or --out DIR)", flag="--lowshot",
        type=float, nargs="+", metavar="F", group=_GROUP, default_help="")
    modes: tuple[str, ...] = opt(MODES, "probe, finetune or both", flag="--lowshot-modes", nargs="+", choices=MODES,
                                 group=_GROUP, default_help="both")
    train_split: str = opt("train", "split the subsets are drawn from", group=_GROUP)
    val_split: str = opt("validation", flag="--split")
    seed: int = opt(0, "subset draw seed, as select --seed", type=int, group=_GROUP)
    batch_size: int = opt(64)
    device: str = opt("auto")
    num_workers: int = opt(0, flag="--workers")
    ema: bool = opt(False)
    img_size: int | None = opt(None, "input size", type=positive_int, group=_GROUP,
                               default_help="default: the run's")
    probe_wds: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)  # L2 strengths tried (mean CE + wd/2 |W|^2)
    probe_iters: int = 100  # L-BFGS iterations per fit
    ft_steps: int = opt(500, "fine-tuning steps per subset", type=positive_int, group=_GROUP)
    ft_lr: float = opt(1e-4, "fine-tuning peak learning rate", type=float, group=_GROUP)
    ft_batch_size: int | None = opt(None, "fine-tuning batch size", type=positive_int, group=_GROUP,
                                    default_help="default --batch-size")
    ft_warmup_steps: int | None = None  # default: ft_steps // 10
    ft_weight_decay: float = 0.05
    ft_optimizer: str = "adamw"
    out: str | None = opt(None)  # default RUN/lowshot

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "modes", tuple(self.modes))
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise UserError(f"fractions must be in (0, 1], got {self.fractions}")
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise UserError(f"modes must be among {', '.join(MODES)}, got {', '.join(self.modes) or 'none'}")
        if self.batch_size < 1 or self.ft_steps < 1 or self.probe_iters < 1:
            raise UserError("batch_size, ft_steps and probe_iters must be >= 1")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.ft_lr <= 0 or not self.probe_wds or any(w < 0 for w in self.probe_wds):
            raise UserError("ft_lr must be > 0 and probe_wds non-empty and >= 0")


@dataclass(frozen=True)
class Record:
    """One sample of a split: its key, class and where its members are."""

    key: str
    cls: int
    shard: str  # path of the tar
    members: tuple[tuple[str, int, int], ...]  # (ext, offset, size) in tar order
    image: tuple[int, int]  # (offset, size) of the image member


def fraction_tag(f: float) -> str:
    """``0.01`` -> ``"1pct"``, ``0.1`` -> ``"10pct"``, ``0.005`` -> ``"0.5pct"``."""
    return f"{100 * f:g}pct"


# ---------------------------------------------------------------------------------------
# the split and the subset


def index_split(trainset: str, split: str) -> list[Record]:
    """Every sample of ``split`` in file order, with its ``cls`` (read from the ``.cls`` member)."""
    ts = TrainSet(trainset)
    out: list[Record] = []
    for name in ts.split(split).get("filenames", []):
        path = str(ts.tar_path(name))  # a set at a URL: the staging path naming the object, read by range
        with open_read(path, INDEX_READ_AHEAD) as f:
            for s in iter_tar_samples(f):
                ext = s.image_ext()
                if ext is None:
                    raise UserError(f"{display(path)}: sample {s.key} has no image member")
                if "cls" not in s.members:
                    raise UserError(f"{display(path)}: sample {s.key} has no .cls member (low-shot needs class labels)")
                cls = int(read_member(f, *s.members["cls"]).decode().strip())
                mem = tuple((e, o, n) for e, (o, n) in s.members.items())
                out.append(Record(s.key, cls, path, mem, s.members[ext]))
    return out


def balanced_subset(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """The label-balanced subset ``select --fraction --balanced`` draws (in the input's order).
    Samples with ``cls < 0`` are not eligible."""
    by_cls: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        if r.cls >= 0:
            by_cls[r.cls].append(r)
    n = sum(len(v) for v in by_cls.values())
    total = math.floor(fraction * n + 1e-9)
    quotas = balanced_quotas({c: len(v) for c, v in by_cls.items()}, total, seed)
    chosen: set[str] = set()
    for c, rs in by_cls.items():
        ranked = sorted(rs, key=lambda r: (hashlib.md5(f"{seed}:f:{r.key}".encode()).hexdigest(), r.key))
        chosen.update(r.key for r in ranked[: quotas[c]])
    return [r for r in records if r.key in chosen]


# ---------------------------------------------------------------------------------------
# features and the linear probe


class _Images(torch.utils.data.Dataset):
    """Decoded, eval-transformed images of records (one open file per shard per worker)."""

    def __init__(self, records: Sequence[Record], lcfg: LoaderConfig):
        self.records = list(records)
        self.lcfg = lcfg
        self.files: dict[str, Any] = {}
        self.mean = torch.tensor(lcfg.mean).view(3, 1, 1)
        self.std = torch.tensor(lcfg.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __getitem__(self, i: int) -> torch.Tensor:
        r = self.records[i]
        f = self.files.get(r.shard)
        if f is None:
            f = self.files[r.shard] = open_read(r.shard, 0)  # one ranged read per image
        img = decode_image(read_member(f, *r.image), self.lcfg, None)
        return to_tensor(img, self.mean, self.std)


@torch.inference_mode()
def extract_features(model: torch.nn.Module, records: Sequence[Record], lcfg: LoaderConfig, device: torch.device,
                     log: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Pre-logits features ``(len(records), D)`` (float32, on the CPU) with the eval transform."""
    ds = _Images(records, lcfg)
    dl = torch.utils.data.DataLoader(ds, batch_size=lcfg.batch_size, shuffle=False, num_workers=lcfg.num_workers,
                                     pin_memory=device.type == "cuda")
    feats, done = [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    try:
        for x in dl:
            with autocast:
                h = model.forward_features(x.to(device, non_blocking=True))
                h = model.forward_head(h, pre_logits=True)
            feats.append(h.float().flatten(1).cpu())
            done += len(x)
            if log is not None:
                log(done, len(ds))
    finally:
        ds.close()
    return torch.cat(feats) if feats else torch.zeros(0, 0)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, iters: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS: minimise mean CE + ``wd``/2 * |W|^2 (bias not
    decayed). Returns ``(W (D, C), b (C,))``. Deterministic for the same inputs."""
    d = x.shape[1]
    w = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    xd, yd = x.double(), y.long()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xd @ w + b, yd) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def _holdout(records: Sequence[Record], seed: int) -> np.ndarray:
    """A deterministic ~1/5 of the subset (by md5 of seed and key) to choose the L2 strength."""
    return np.array([int(hashlib.md5(f"{seed}:probe:{r.key}".encode()).hexdigest()[:8], 16) % 5 == 0
                     for r in records], dtype=bool)


def _accuracy(scores: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float | None]:
    keep = y >= 0
    scores, y = scores[keep], y[keep]
    if len(y) == 0:
        return {f"top{k}": None for k in ks}
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == y[:, None]
    return {f"top{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, holdout: np.ndarray, val_x: torch.Tensor,
                 val_y: torch.Tensor, num_classes: int, wds: Sequence[float], iters: int) -> dict[str, Any]:
    """Choose the L2 strength on the held-out part (when it has samples on both sides), refit on
    the whole subset, score the validation features."""
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True, unbiased=False).clamp(min=1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    sweep: dict[str, float] = {}
    hold = torch.from_numpy(holdout)
    if len(wds) > 1 and 0 < int(hold.sum()) < len(hold):
        for wd in wds:
            w, b = fit_logistic(tx[~hold], train_y[~hold], num_classes, wd, iters)
            sweep[f"{wd:g}"] = _accuracy(tx[hold] @ w + b, train_y[hold], (1,))["top1"]
        best = max(wds, key=lambda wd: (sweep[f"{wd:g}"], wd))  # ties: the stronger regulariser
    else:
        best = sorted(wds)[len(wds) // 2]
    w, b = fit_logistic(tx, train_y, num_classes, best, iters)
    return {"wd": best, "sweep_holdout_top1": sweep, "train_top1": _accuracy(tx @ w + b, train_y, (1,))["top1"],
            **_accuracy(vx @ w + b, val_y)}


# ---------------------------------------------------------------------------------------
# fine-tuning


def write_subset_trainset(src: str, records: Sequence[Record], out: Path, split: str = "train") -> Path:
    """Copy ``records`` (members byte for byte) into a training set at ``out`` with one split
    ``split``: tars of at most 1,000 samples, ``classes.json`` copied, ``_info.json`` last.
    An existing complete copy of the same keys is reused."""
    keys_doc = hashlib.sha256("\n".join(r.key for r in records).encode()).hexdigest()
    info_path = TrainSet(out).info_path
    if is_file(info_path):  # at a URL: the store's object
        try:
            old = json.loads(read_bytes(info_path))
            if old.get("silverlabel", {}).get("keys_sha256") == keys_doc:
                return out
        except json.JSONDecodeError:
            pass
        remove(info_path)
    out.mkdir(parents=True, exist_ok=True)
    names, lengths, files = [], [], {}
    try:
        for s in range(0, max(1, math.ceil(len(records) / SUBSET_SHARD_SIZE))):
            chunk = records[s * SUBSET_SHARD_SIZE:(s + 1) * SUBSET_SHARD_SIZE]
            name = f"subset-{split}-{s:04d}.tar"
            with atomic_write(out / name) as f, ShardWriter(f) as w:
                for r in chunk:
                    fh = files.get(r.shard)
                    if fh is None:
                        fh = files[r.shard] = open_read(r.shard, 0)
                    w.write(r.key, {e: read_member(fh, o, n) for e, o, n in r.members})
            names.append(name)
            lengths.append(len(chunk))
    finally:
        for fh in files.values():
            fh.close()
    if is_file(TrainSet(src).classes_path):
        with atomic_write(TrainSet(out).classes_path) as f:
            f.write(read_bytes(TrainSet(src).classes_path))
    write_json_atomic(info_path, {
        "name": "subset", "splits": {split: {"name": split, "num_samples": len(records), "filenames": names,
                                             "shard_lengths": lengths}},
        "silverlabel": {"source": dataset_identity(src), "keys_sha256": keys_doc}})
    return out


# ---------------------------------------------------------------------------------------
# the run


def run_lowshot(cfg: LowShotConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol (see the module docstring); writes ``lowshot.json`` and returns it."""
    from silverlabel.stages.evaluate import EvalConfig, run_eval
    from silverlabel.stages.train import TrainConfig, run_train

    t0 = time.monotonic()
    if cfg.out is not None:
        check_writable(cfg.out, "--out")
        if url_of(cfg.out) is None:
            check_target(cfg.out, "--out", folder=True)
    ckpt = find_checkpoint(cfg.run)
    out = local_target(cfg.out) if cfg.out else run_folder(cfg.run, ckpt) / "lowshot"  # a URL's: its staging path
    train = index_split(cfg.trainset, cfg.train_split)
    val = index_split(cfg.trainset, cfg.val_split)
    classes = sorted({r.cls for r in train if r.cls >= 0})
    if not classes:
        raise UserError(f"{cfg.trainset}: split {cfg.train_split!r} has no labeled samples")
    num_classes = max(classes + [r.cls for r in val]) + 1
    num_classes = max(num_classes, int(TrainSet(cfg.trainset).read_classes().get("num_classes", 0)))
    subsets = {f: balanced_subset(train, f, cfg.seed) for f in cfg.fractions}
    for f, sub in subsets.items():
        if not sub:
            raise UserError(f"fraction {f:g} of {len(train)} training samples is empty")

    model, tconf, which, step = load_model(ckpt, cfg.ema)
    device = torch_device(cfg.device)
    img_size = cfg.img_size or int(tconf.get("img_size", 224))
    results: dict[str, Any] = {}
    # the weights both modes start from (the EMA ones with --ema), without the head: the
    # fine-tune always gets a new head, also when the class count happens to match
    init = out / "init.pt"
    init_sha = save_backbone(model, init)
    if img_size != int(tconf.get("img_size", 224)):  # probe at another size: pos_embed resampled
        from silverlabel.stages.train import TrainConfig as _TC, create_model, load_init

        model = create_model(_TC("-", "-", model=str(tconf["model"]), img_size=img_size), 1)
        load_init(model, str(init))
        model.eval()

    if "probe" in cfg.modes:
        model.to(device)
        lcfg = LoaderConfig(cfg.trainset, split=cfg.train_split, batch_size=cfg.batch_size, img_size=img_size,
                            train=False, num_workers=cfg.num_workers)
        union = sorted({r.key for s in subsets.values() for r in s})
        pos = {k: i for i, k in enumerate(union)}
        keyed = {r.key: r for r in train}
        log(f"low-shot probe: features of {len(union)} subset and {len(val)} validation images ({which} weights)")
        tr_feats = extract_features(model, [keyed[k] for k in union], lcfg, device)
        va_feats = extract_features(model, val, lcfg, device)
        va_y = torch.tensor([r.cls for r in val])
        for f, sub in subsets.items():
            idx = torch.tensor([pos[r.key] for r in sub])
            res = linear_probe(tr_feats[idx], torch.tensor([r.cls for r in sub]), _holdout(sub, cfg.seed), va_feats,
                               va_y, num_classes, cfg.probe_wds, cfg.probe_iters)
            results.setdefault(fraction_tag(f), {})["probe"] = res
            log(f"  probe {fraction_tag(f)}: top-1 {_pct(res['top1'])} (wd {res['wd']:g})")
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "finetune" in cfg.modes:
        for f, sub in subsets.items():
            tag = fraction_tag(f)
            sdir = write_subset_trainset(cfg.trainset, sub, out / f"subset-{tag}", cfg.train_split)
            rdir = out / f"finetune-{tag}"
            bs = min(cfg.ft_batch_size or cfg.batch_size, len(sub))
            tcfg = TrainConfig(str(sdir), str(rdir), model=str(tconf["model"]), img_size=img_size, batch_size=bs,
                               steps=cfg.ft_steps, lr=cfg.ft_lr, weight_decay=cfg.ft_weight_decay,
                               warmup_steps=cfg.ft_steps // 10 if cfg.ft_warmup_steps is None else cfg.ft_warmup_steps,
                               optimizer=cfg.ft_optimizer, loss="ce", seed=cfg.seed, device=cfg.device,
                               num_workers=cfg.num_workers, init=str(init), log_every=max(1, min(10, cfg.ft_steps)),
                               ckpt_every=max(1, cfg.ft_steps // 4))
            # an earlier fine-tune is resumed (or reused) only if it started from the same
            # weights, subset and settings; otherwise it is started again
            stamp = {"init_sha256": init_sha, "subset": json.loads(read_bytes(sdir / "_info.json"))
                     ["silverlabel"]["keys_sha256"],  # the settings, less where (init: by its sha256)
                     "train": {k: v for k, v in asdict(tcfg).items() if k not in ("trainset", "output", "init")}}
            if _read_json(rdir / STAMP_FILE) != stamp:
                _remove_tree(rdir)
            rdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(rdir / STAMP_FILE, stamp)
            log(f"low-shot fine-tune {tag}: {len(sub)} images, {cfg.ft_steps} steps of {bs}")
            s = run_train(tcfg, resume=is_file(Run(rdir).checkpoint_path), progress=False)
            ev = run_eval(EvalConfig(str(rdir), cfg.trainset, split=cfg.val_split, batch_size=cfg.batch_size,
                                     device=cfg.device, num_workers=cfg.num_workers,
                                     out=str(rdir / f"eval-{cfg.val_split}.json")))
            results.setdefault(tag, {})["finetune"] = {
                "top1": ev["top1"], "top5": ev.get("top5"), "steps": s.steps, "final_loss": _last_loss(rdir),
                "batch_size": bs, "run": rdir.name, "trainset": sdir.name}  # beside lowshot.json
            log(f"  fine-tune {tag}: top-1 {_pct(ev['top1'])}")

    report = {
        "run": run_name(cfg.run, ckpt), "checkpoint": input_name(fetch_local(ckpt)), "weights": which, "step": step,
        "model": tconf.get("model"), "trainset": dataset_identity(cfg.trainset), "train_split": cfg.train_split,
        "val_split": cfg.val_split,
        "img_size": img_size, "num_classes": num_classes, "train_samples": len(train), "val_samples": len(val),
        "subsets": {fraction_tag(f): {"fraction": f, "samples": len(s),
                                      "per_class": _quota_range(s)} for f, s in subsets.items()},
        "results": results, "seconds": round(time.monotonic() - t0, 3),
        "config": {**asdict(cfg), "run": run_name(cfg.run, ckpt), "trainset": dataset_identity(cfg.trainset),
                   "out": None},  # inputs by their ids: nothing says where the run was
    }
    write_json_atomic(out / "lowshot.json", report)
    report["output"] = display(out / "lowshot.json")
    report["paths"] = {"run": display(cfg.run), "checkpoint": display(ckpt), "trainset": display(cfg.trainset)}
    return report


def save_backbone(model: torch.nn.Module, path: Path) -> str:
    """Write ``model``'s weights without its classifier (timm's ``get_classifier()``) to
    ``path`` atomically, as a plain state dict; returns the file's sha256."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    skip = {f"{name}.{p}" for name, mod in model.named_modules() if head is not None and mod is head
            for p, _ in mod.named_parameters()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_bytes(path))  # at a URL: the store's object
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _remove_tree(folder: Path) -> None:
    """Remove a folder: for a staging path, every object under the prefix it names (and the
    staged copy); nothing when there is none."""
    u = url_of(folder)
    if u is not None:
        from silverlabel import fs

        fs.forget_one(u)
        try:
            rels = fs.walk_files(u)
        except (FileNotFoundError, NotADirectoryError):
            rels = []
        for rel in rels:
            remove(f"{u}/{rel}")
    shutil.rmtree(folder, ignore_errors=True)


def _last_loss(run: Path) -> float | None:
    """The last logged loss of a run (also when a rerun found it finished)."""
    path = Run(run).metrics_jsonl
    rows = [json.loads(ln) for ln in read_bytes(path).decode().splitlines() if ln.strip()] if is_file(path) else []
    return rows[-1]["loss"] if rows else None


def _quota_range(records: Sequence[Record]) -> list[int]:
    counts: dict[int, int] = defaultdict(int)
    for r in records:
        counts[r.cls] += 1
    return [min(counts.values()), max(counts.values())] if counts else [0, 0]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:6.2f}%"


def format_lowshot(r: dict[str, Any]) -> str:
    """A readable table of a low-shot report."""
    where = r.get("paths") or r  # the local paths of a report just made, else the ids it records
    lines = [f"silverlabel eval --lowshot: {where['checkpoint']} ({r['weights']} weights, step {r['step']}) on "
             f"{where['trainset']}",
             f"  subsets of {r['train_samples']} {r['train_split']} samples; "
             f"accuracy on all {r['val_samples']} {r['val_split']} samples",
             "",
             f"  {'subset':>8}  {'images':>8}  {'per class':>10}  {'mode':>9}  {'top-1':>8}  {'top-5':>8}"]
    for tag, sub in r["subsets"].items():
        lo, hi = sub["per_class"]
        for mode in MODES:
            res = r["results"].get(tag, {}).get(mode)
            if res is None:
                continue
            lines.append(f"  {tag:>8}  {sub['samples']:>8}  {f'{lo}..{hi}' if lo != hi else str(lo):>10}  {mode:>9}  "
                         f"{_pct(res.get('top1')):>8}  {_pct(res.get('top5')):>8}")
    lines.append(f"\n  report: {r.get('output')}")
    return "\n".join(lines)


__all__ = ["LowShotConfig", "Record", "index_split", "balanced_subset", "extract_features", "fit_logistic",
           "linear_probe", "write_subset_trainset", "run_lowshot", "format_lowshot", "fraction_tag"]
