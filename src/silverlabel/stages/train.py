"""``silverlabel train``: train a timm model on a ``silverlabel shard`` training set.

One plain loop that reads top to bottom (nanoGPT-style)::

    >>> cfg = TrainConfig("data/trainset", "runs/vit-s", steps=10_000, loss="bce-multihot")  # doctest: +SKIP
    >>> summary = run_train(cfg)                                                             # doctest: +SKIP

- **Model**: ``timm.create_model(model, pretrained=False, num_classes=N, img_size=...)``
  (``img_size`` only for models that take it). ``N`` is ``num_classes`` of
  ``TRAINSET/classes.json`` for ``loss="ce"`` (targets: the ``cls`` of each sample). For
  ``bce-multihot``/``soft-topk`` the targets are the teacher's top-k ``labels`` (indices in
  the teacher's label space), so ``N`` is ``label_space_classes`` or, when that is None, the
  size of ``classes.json``'s ``label_space`` (in1k 1000, in12k 11821, in21k 21841);
  anything else is an error asking for ``--label-space-classes``.
- **Losses**: ``ce``: cross-entropy on ``cls`` with ``label_smoothing`` (``cls == -1``
  ignored). ``bce-multihot``: sigmoid BCE against a multi-hot of the top-k labels (all of
  them, or those with ``prob >= label_threshold``), summed over classes and averaged over the
  batch; the head bias starts at -10 (COYO-ViT). ``label_smoothing`` is not applied to it.
  ``soft-topk``: cross-entropy to the renormalised top-k probabilities (KL up to a
  constant; padding ``-1``/``0.0`` ignored), mixed with ``label_smoothing`` of uniform.
  ``kd`` (on a ``silverlabel reinforce`` output): each sample is one of its stored
  augmentations, replayed exactly, and its target the teacher's stored top-k densified by
  spreading the leftover mass uniformly over the other classes (ImageNet+'s "smooth");
  the loss is KL(teacher || student). ``kd_aug`` picks the augmentation (``random`` per
  (seed, epoch, key), or ``sequential``: ``epoch % K``); ``p_reinforced < 1`` mixes in plain
  samples (usual crop/flip, their ``.json`` top-k densified the same way). The head is the
  reinforce label space (``num_classes`` in the manifest's ``reinforce`` block).
- **Optimisation**: AdamW (no decay on biases/norms/1-d params and pos/cls tokens) or SGD
  (momentum 0.9, nesterov off); :func:`lr_at` is a pure function of the step (linear warmup,
  then cosine or linear decay to 0); gradient clipping; ``accum_steps`` micro-batches per
  step; bf16 autocast on CUDA only; optional EMA of the weights (``ema_decay``).
- **Steps and data**: one step = ``accum_steps`` loader batches of ``batch_size`` (per
  rank). ``steps_per_epoch = loader steps // accum_steps``; global step ``s`` is in epoch
  ``s // steps_per_epoch`` and starts at loader batch ``(s % steps_per_epoch) *
  accum_steps``; the loader is a pure function of (seed, epoch, start_step), so resuming
  needs only the step. ``steps`` (if given) overrides ``epochs``.
- **Checkpoints**: ``RUN/checkpoint.pt`` every ``ckpt_every`` steps and at the end, plus
  ``RUN/checkpoint-final.pt``; a plain dict ``{model, optimizer, ema, step, epoch, config,
  world_size, torch_rng, format}`` (config a plain dict) written atomically, loadable with
  ``torch.load(..., weights_only=True)``. ``resume=True`` continues at the exact step; on CPU
  the loss trajectory equals the uninterrupted run (deterministic algorithms, fixed seeds).
- **Metrics**: ``RUN/metrics.jsonl`` and ``RUN/metrics.csv``, one row per ``log_every``
  steps: step, epoch, loss (that step's loss, averaged over ranks), lr, samples/s. On resume
  the rows after the checkpoint's step are dropped first. The same scalars go to TensorBoard
  event files in ``RUN/tb`` (``tensorboard --logdir RUN``; resumed runs purge the steps after
  the checkpoint).
- **At a URL** (issue 16): the training set may be a URL of any fsspec store
  (``s3://bucket/trainset``; read streaming, :mod:`silverlabel.loader`), and so may the run
  folder ``-o``: it is written in this process's staging folder
  (:func:`silverlabel.dataset.stage_path`) and uploaded as it goes: each checkpoint by
  :func:`~silverlabel.dataset.atomic_write` as it closes (one PUT), ``metrics.jsonl`` and
  ``metrics.csv`` whole at each checkpoint and at the end (an object cannot be appended to),
  the TensorBoard event files at the end. ``resume`` needs only the store: the checkpoint and
  the metrics files are fetched from it. The checkpoints are the same bytes wherever the run
  and its training set are (the set is stored by id).
- **DDP**: when ``WORLD_SIZE > 1`` (torchrun), a gloo (CPU) or nccl (CUDA) process group,
  ``DistributedDataParallel``, and the loader's ``rank``/``world_size``; only rank 0 writes.
  ``batch_size`` is per rank; the global batch ``N * batch_size`` is read in one global
  order and rank ``r`` trains on the ``r``-th slice of it (:mod:`silverlabel.loader`), so an
  N-rank run sees the same batches, augmentations included, as a 1-process run with
  ``batch_size * N``, and its logged loss (the mean over ranks) and weights equal that run's
  up to float summation order (tested on the CPU over gloo). BatchNorm becomes SyncBatchNorm
  on CUDA (global-batch statistics); on the CPU it stays per rank. A run resumes only with
  the world size it started with. Loader workers per rank default to the rank's share of
  the cores less one on a GPU (:func:`loader_workers`), batches are pinned and copied
  non-blocking, and travel as uint8 (normalised on the GPU).
- **Fine-tuning** (``init``): weights from a checkpoint (or a plain state dict); tensors
  whose shape differs are dropped (a new head when the class count differs) except
  ``pos_embed``, which is resampled to the new ``img_size`` (timm's
  ``resample_abs_pos_embed``). Optimizer state and step are not taken over.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from silverlabel.dataset import (Run, TrainSet, atomic_write, check_target, check_writable, dataset_identity, display,
                                 fetch_local, input_name, is_file, is_identity, local_target, make_identity, publish,
                                 url_of)
from silverlabel.devices import torch_device
from silverlabel.errors import UserError
from silverlabel.loader import EpochBatches, LoaderConfig, normalize_on, steps_per_epoch
from silverlabel.losses import LOSSES as _LOSS_REGISTRY
from silverlabel.losses import Batch, get_loss, kd_loss, kd_target, loss_names  # noqa: F401  (kd_*: re-exported)
from silverlabel.options import cpu_count, device_field, float_or_off, opt, positive_int
from silverlabel.teachers.labelspace import SPACES, space_size

#: what a run says while it works: ``info`` where its weights came from and the step it resumed at,
#: ``warning`` what the user should know (rank 0 only)
log = logging.getLogger(__name__)

LOSSES = _LOSS_REGISTRY.keys()  # a live view of the loss registry
CKPT_FORMAT = 1
METRIC_FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s")


@dataclass(frozen=True)
class TrainConfig:
    trainset: str = opt(help="training set folder (silverlabel shard)", positional=True, metavar="TRAINSET")
    output: str = opt(help="run folder (checkpoints, metrics)", short="-o", metavar="RUN", required=True)
    model: str = opt("vit_small_patch16_224", "timm model name")
    img_size: int = opt(224, "input size", type=positive_int)
    batch_size: int = opt(64, "batch size per rank and micro-step", type=positive_int)
    steps: int | None = opt(None, "optimizer steps", type=positive_int, default_help="default: --epochs worth")
    epochs: int = opt(1, "epochs when --steps is not given", type=positive_int)
    lr: float = opt(1e-3, "peak learning rate", type=float)
    warmup_steps: int = opt(0, "linear warmup steps", type=int)
    weight_decay: float = opt(0.05, "weight decay", type=float)
    grad_clip: float | None = opt(1.0, "gradient norm clip; 0 = off", type=float_or_off)
    optimizer: str = opt("adamw", "", choices=("adamw", "sgd"), default_help="")
    schedule: str = opt("cosine", "", choices=("cosine", "linear"), default_help="")
    loss: str = opt("ce", "kd: distil from the stored teacher outputs of a silverlabel reinforce output",
                    choices=loss_names)
    label_threshold: float | None = opt(None, "bce-multihot: only labels with prob >= T", type=float)
    label_smoothing: float = opt(0.0, "ce / soft-topk label smoothing", type=float)
    label_space_classes: int | None = opt(None, "head size for bce-multihot/soft-topk", type=positive_int,
                                          default_help="default: from classes.json's label_space")
    seed: int = opt(0, "", type=int, default_help="")
    device: str = device_field()  # auto | cpu | cuda | cuda:N
    accum_steps: int = opt(1, "gradient accumulation micro-steps", type=positive_int)
    ema_decay: float | None = opt(None, "keep an EMA of the weights with this decay", type=float)
    ckpt_every: int = opt(100, "checkpoint every N steps", type=positive_int)
    log_every: int = opt(10, "metrics row every N steps", type=positive_int)
    num_workers: int = opt(-1, "loader worker processes per rank; -1 = auto", flag="--workers", type=int,
                           default_help="default: 0 on CPU; on a GPU the rank's share of the cores - 1 "
                                        "(cores / LOCAL_WORLD_SIZE - 1, at most 32)")
    init: str | None = opt(None, "fine-tune from this checkpoint (new head / pos-embed resampled)", metavar="CKPT")
    kd_aug: str = opt("random", "kd: which stored augmentation a sample replays: random per epoch, or epoch %% K",
                      choices=("random", "sequential"))
    p_reinforced: float = opt(1.0, "kd: share of samples on a stored augmentation; the rest are plain samples",
                              type=float)
    tensorboard: bool = opt(True, "do not write TensorBoard events to RUN/tb", flag="--no-tensorboard",
                            action="store_false", default_help="")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "linear"):
            raise UserError(f"schedule must be cosine or linear, got {self.schedule!r}")
        for name in ("img_size", "batch_size", "epochs", "accum_steps", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.warmup_steps < 0 or self.seed < 0:
            raise UserError("warmup_steps and seed must be >= 0")
        if self.num_workers < -1:
            raise UserError(f"num_workers must be >= 0 (or -1: auto), got {self.num_workers}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.kd_aug not in ("random", "sequential"):
            raise UserError(f"kd_aug must be random or sequential, got {self.kd_aug!r}")
        if not 0.0 <= self.p_reinforced <= 1.0:
            raise UserError(f"p_reinforced must be in [0, 1], got {self.p_reinforced}")
        if self.label_space_classes is not None and self.label_space_classes < 1:
            raise UserError(f"label_space_classes must be >= 1, got {self.label_space_classes}")


@dataclass
class TrainSummary:
    output: str
    steps: int  # global step reached
    start_step: int  # step this run started at (> 0 when resumed)
    epochs: float
    final_loss: float | None
    seconds: float
    samples_per_second: float
    num_classes: int
    checkpoint: str
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of every logged step


# ---------------------------------------------------------------------------------------
# pieces


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of (0-based) ``step``: linear warmup over ``warmup_steps``, then cosine
    or linear decay to 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    p = min(max(p, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr * (1.0 - p)


def num_classes_for(cfg: TrainConfig) -> int:
    """The head size (see the module docstring)."""
    path = display(TrainSet(cfg.trainset).classes_path)  # at a URL: its public URL, never a staging path
    doc = TrainSet(cfg.trainset).read_classes()
    targets = get_loss(cfg.loss).targets
    if targets == "class":
        if "num_classes" not in doc:
            raise UserError(f"{path}: missing or has no num_classes (needed for --loss {cfg.loss})")
        return int(doc["num_classes"])
    if cfg.label_space_classes is not None:
        return cfg.label_space_classes
    if targets == "reinforced":
        rinfo = TrainSet(cfg.trainset).reinforce_info()
        if rinfo is None or not rinfo.get("num_classes"):
            raise UserError(f"{cfg.trainset}: not a reinforced training set (run silverlabel reinforce), "
                             "or pass --label-space-classes")
        return int(rinfo["num_classes"])
    space = doc.get("label_space")
    if space in SPACES:
        return space_size(space)
    raise UserError(f"{path}: label_space is {space!r}, not one of {', '.join(SPACES)}; "
                     f"pass --label-space-classes for --loss {cfg.loss}")


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The timm model of ``cfg``; a UserError for an unknown name, or an ``img_size`` that is
    not a multiple of a patch model's patch size (below it, timm builds a model of no patches)."""
    import timm

    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, img_size=cfg.img_size)
    except TypeError:  # models without an img_size argument (CNNs)
        return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown timm model {cfg.model!r}") from e
        raise
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and not getattr(model.patch_embed, "dynamic_img_pad", False):
        p = max(patch) if isinstance(patch, (tuple, list)) else int(patch)
        if cfg.img_size < p or cfg.img_size % p:
            raise UserError(f"--img-size {cfg.img_size}: {cfg.model} needs a multiple of its patch size {p} "
                            f"(e.g. {max(p, cfg.img_size // p * p)})")
    return model


def load_weights(path: str | os.PathLike, flag: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``, never running pickled code: a UserError naming
    ``flag`` and the file when it holds Python objects other than tensors and plain containers,
    or is not a PyTorch file at all."""
    import pickle

    if not is_file(path):
        raise FileNotFoundError(f"{flag}: no such file: {display(path)}")
    local, path = fetch_local(path), display(path)  # an object in a store: read from its staged copy
    try:
        return torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False, which would run the file's code: never say that
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise UserError(f"{flag} {path}: holds pickled Python objects, not only weights; refused (pickles can "
                            "run code): save its state_dict, or use safetensors") from None
        why = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0][:200]
        raise UserError(f"{flag} {path}: not a readable PyTorch checkpoint ({why})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{flag} {path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from None


#: TrainConfig fields that are no part of a run's id (where it is written, how fast)
RUNTIME_FIELDS = ("output", "device", "num_workers", "ckpt_every", "log_every", "tensorboard")
#: TrainConfig fields a resumed run may change: where things are and how fast, plus the length
#: (``steps``/``epochs``: a finished run is continued). Any other change is another run
#: (``--init`` may be left out: the weights come from the checkpoint).
RESUMABLE_CHANGES = RUNTIME_FIELDS + ("trainset", "steps", "epochs")


def published_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config a checkpoint stores: the training set by its id, ``init`` by its name (a
    file's name and content digest), no output folder -- nothing that says where the run was.

    >>> published_config(TrainConfig("data/ts", "runs/x"))["trainset"]  # doctest: +SKIP
    'trainset@sha256:...'
    """
    d = asdict(cfg)
    d.pop("output")
    d["trainset"] = dataset_identity(cfg.trainset)
    if cfg.init is not None:  # at a URL: named by its bytes too (staged once; load_weights reads that copy)
        d["init"] = input_name(fetch_local(cfg.init) if url_of(cfg.init) is not None else cfg.init)
    return d


def run_identity(config: dict[str, Any]) -> str:
    """A run's id (``run@sha256:...``): its published config less the runtime fields."""
    return make_identity("run", {k: v for k, v in config.items() if k not in RUNTIME_FIELDS})


def check_resume(ckpt_path: str | os.PathLike, stored: Any, cfg: TrainConfig) -> None:
    """A UserError naming every setting of ``cfg`` that differs from the checkpoint's config."""
    from silverlabel.stage import changed_settings

    if not isinstance(stored, dict):
        raise UserError(f"{ckpt_path}: not a silverlabel train checkpoint (no config); choose another -o")
    named = published_config(cfg)
    if cfg.init is not None and not is_identity(stored.get("init")):  # an older checkpoint: init by path
        named["init"] = cfg.init
    given = {k: v for k, v in named.items() if k in stored}  # a field newer than the checkpoint: its default
    diffs = changed_settings(stored, given, ignore=RESUMABLE_CHANGES + (("init",) if cfg.init is None else ()))
    if diffs:
        shown = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)} (was {stored.get(k)})" for k in diffs)
        raise UserError(f"{ckpt_path}: the run was started with other settings: {shown}; resume with the same "
                        "settings or choose another -o")


def load_init(model: torch.nn.Module, path: str) -> dict[str, list[str]]:
    """Load fine-tuning weights into ``model``: mismatched tensors are dropped (the head)
    except ``pos_embed``, which is resampled. Returns ``{"dropped", "resampled", "missing"}``."""
    from timm.layers import resample_abs_pos_embed

    ck = load_weights(path, "--init")
    state = ck["model"] if isinstance(ck, dict) and isinstance(ck.get("model"), dict) else ck
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--init {path}: not a checkpoint or state dict of tensors")
    own = model.state_dict()
    out: dict[str, list[str]] = {"dropped": [], "resampled": [], "missing": []}
    new_state = {}
    for k, v in state.items():
        if k not in own:
            out["dropped"].append(k)
        elif own[k].shape == v.shape:
            new_state[k] = v
        elif k.endswith("pos_embed") and v.ndim == 3 and hasattr(model, "patch_embed"):
            npt = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
            new_state[k] = resample_abs_pos_embed(v, new_size=list(model.patch_embed.grid_size),
                                                  num_prefix_tokens=npt)
            out["resampled"].append(k)
        else:
            out["dropped"].append(k)
    res = model.load_state_dict(new_state, strict=False)
    out["missing"] = list(res.missing_keys)
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms (1-d tensors) and timm's no_weight_decay() names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def compute_loss(cfg: TrainConfig, logits: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor,
                 probs: torch.Tensor) -> torch.Tensor:
    """The batch loss (float32) for ``cfg.loss`` (:mod:`silverlabel.losses`)."""
    return get_loss(cfg.loss)(logits, Batch(cls, labels, probs), cfg)


class Ema:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path) as f:
        f.write(buf.getbuffer())


def _metrics_truncate(out: Path, step: int) -> None:
    """On resume: drop metric rows after ``step`` (written after the checkpoint); rewritten
    through :func:`~silverlabel.dataset.atomic_write` (an output at a URL: uploaded)."""
    jl = Run(out).metrics_jsonl
    if jl.exists():
        lines = [ln for ln in jl.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        with atomic_write(jl) as f:
            f.write("".join(ln + "\n" for ln in lines).encode())
        with atomic_write(Run(out).metrics_csv) as f:
            s = io.StringIO()
            w = csv.DictWriter(s, fieldnames=METRIC_FIELDS, lineterminator="\n")
            w.writeheader()
            for ln in lines:
                w.writerow({k: json.loads(ln)[k] for k in METRIC_FIELDS})
            f.write(s.getvalue().encode())


_EVENTS = "events.out.tfevents."


def _neutral_event_names(tb_dir: Path) -> None:
    """Rename TensorBoard's event files so their names hold no host name or process id
    (``events.out.tfevents.TIME.HOST.PID.N`` -> ``events.out.tfevents.TIME.silverlabel.K``):
    a published run says nothing about the machine it ran on. TensorBoard reads any
    ``*tfevents*`` file in name order; the time stays first, so the order is kept. A run at a
    URL: a name its store already holds (an earlier process's events) is not taken."""
    remote = url_of(tb_dir) is not None
    for p in sorted(tb_dir.glob(_EVENTS + "*")):
        parts = p.name[len(_EVENTS):].split(".")
        if len(parts) < 4 or parts[1] == "silverlabel" or not parts[0].isdigit():
            continue  # already neutral, or not a writer's name
        k = 0
        while ((target := p.with_name(f"{_EVENTS}{parts[0]}.silverlabel.{k}")).exists()
               or (remote and is_file(target))):
            k += 1
        p.rename(target)


def _upload_tree(folder: Path) -> None:
    """Upload each file under the staging folder ``folder`` to the object its path names."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            publish(p, url_of(p))


def _tensorboard_writer(path: Path, step: int):
    """A SummaryWriter on ``RUN/tb`` that continues at ``step`` (``purge_step`` hides
    the events logged after the checkpoint: steps > ``step``). None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: CSV/JSONL are always written
        return None
    return SummaryWriter(str(path), purge_step=step + 1)


def loader_workers(requested: int, device_type: str) -> int:
    """Loader worker processes for this rank: ``requested`` when >= 0; auto (-1): 0 on the
    CPU (the model wants the cores), on a GPU this rank's share of the usable cores less one
    for the training process itself: ``cores // LOCAL_WORLD_SIZE - 1``, between 1 and 32
    (cores: :func:`silverlabel.options.cpu_count`; LOCAL_WORLD_SIZE is torchrun's ranks on this host)."""
    if requested >= 0:
        return requested
    if device_type != "cuda":
        return 0
    cores = cpu_count()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(32, cores // local - 1))


def _sync_batchnorm(model: torch.nn.Module, device: torch.device, master: bool = True) -> torch.nn.Module:
    """Under DDP: BatchNorm layers (timm's BatchNormAct2d included) become SyncBatchNorm on
    CUDA, so batch statistics are those of the global batch as in a 1-process run; PyTorch
    has no CPU SyncBatchNorm, so on the CPU they stay per rank (said once, by ``master``)."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        if master:
            log.warning("BatchNorm statistics are per rank under DDP on the CPU (no SyncBatchNorm there); "
                        "losses differ from a 1-process run")
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


# ---------------------------------------------------------------------------------------
# the loop


def run_train(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
              progress: bool = True) -> TrainSummary:
    """Train (see the module docstring). ``resume``: continue from ``RUN/checkpoint.pt``
    (a fresh start when there is none). ``stop_after``: stop (with a checkpoint) once this
    global step is reached, as if interrupted; the schedule still runs to the full length.
    One run at a time per RUN folder: rank 0 holds ``RUN/.lock`` (:func:`~silverlabel.stage.output_lock`).
    It speaks through the ``silverlabel.stages.train`` logger (rank 0 only)."""
    from silverlabel.stage import output_lock

    if _dist_env()[0] != 0:
        return _train(cfg, resume, stop_after, progress)
    check_writable(cfg.output)
    if url_of(cfg.output) is None:
        check_target(cfg.output, "-o", folder=True)
    root = local_target(cfg.output)  # a URL's: this process's staging folder (its lock keeps runs on this machine apart)
    root.mkdir(parents=True, exist_ok=True)
    with output_lock(root):
        return _train(cfg, resume, stop_after, progress)


def _train(cfg: TrainConfig, resume: bool, stop_after: int | None, progress: bool) -> TrainSummary:
    # -- setup: distributed, device, determinism
    rank, world, local_rank = _dist_env()
    ddp = world > 1
    device = torch_device(cfg.device, local_rank if ddp else None)  # a DDP rank: its local GPU
    if ddp and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    run = Run(local_target(cfg.output))  # a URL's: staging paths that name its objects (dataset.url_of)
    out, ckpt_path, final_path = run.root, run.checkpoint_path, run.final_checkpoint_path
    remote = url_of(out) is not None
    ckpt_exists = is_file(ckpt_path)  # an output at a URL: the store's answer
    if ckpt_exists and not resume:
        raise UserError(f"{display(ckpt_path)} exists: pass --resume to continue, or choose another --output")
    if cfg.init is not None and not is_file(cfg.init):
        raise FileNotFoundError(f"--init: no such file: {display(cfg.init)}")
    ck = None
    if resume and ckpt_exists:  # before anything is built: a run resumed with other settings is refused
        ck = load_weights(ckpt_path)
        check_resume(display(ckpt_path), ck.get("config") if isinstance(ck, dict) else None, cfg)
        if int(ck.get("world_size", world)) != world:  # the global batch and the data order depend on it
            raise UserError(f"{display(ckpt_path)}: the run was started with {ck['world_size']} processes, this one has "
                            f"{world}; resume with the same number")
    stored_config = published_config(cfg)  # what the checkpoints say of the run: ids, not paths

    # -- data
    lcfg = LoaderConfig(cfg.trainset, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                        num_workers=loader_workers(cfg.num_workers, device.type), img_size=cfg.img_size,
                        normalize=device.type != "cuda",
                        kd=get_loss(cfg.loss).targets == "reinforced", kd_aug=cfg.kd_aug, p_reinforced=cfg.p_reinforced)
    loader_steps = steps_per_epoch(lcfg)
    per_epoch = loader_steps // cfg.accum_steps
    if per_epoch < 1:
        raise UserError(f"{cfg.trainset}: fewer than batch_size * accum_steps = "
                         f"{cfg.batch_size * cfg.accum_steps} samples per rank; lower --batch-size")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    end = total if stop_after is None else min(total, stop_after)

    # -- model, optimizer, EMA
    num_classes = num_classes_for(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg, num_classes)
    if get_loss(cfg.loss).init_head is not None:
        get_loss(cfg.loss).init_head(model)
    if cfg.init is not None:
        info = load_init(model, cfg.init)
        if master:
            log.info("init from %s: new %s; resampled %s", cfg.init, ", ".join(info["missing"]) or "nothing",
                     ", ".join(info["resampled"]) or "nothing")
    model.to(device)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=0.9)
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay is not None else None

    step = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None and ck.get("ema") is not None:
            ema.module.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["torch_rng"])
        step = int(ck["step"])
        if master:
            log.info("resumed from %s at step %d", display(ckpt_path), step)
    start_step = step
    train_model = model
    if ddp:
        model = _sync_batchnorm(model, device, master)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def upload_metrics() -> None:
        """An output at a URL: put the metrics files whole (an object cannot be appended to)."""
        if master and remote:
            for p in (run.metrics_jsonl, run.metrics_csv):
                publish(p, url_of(p))

    def checkpoint(path: Path) -> None:
        if master:
            upload_metrics()
            save_checkpoint(path, {
                "format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None, "step": step,
                "epoch": step // per_epoch, "config": stored_config, "id": run_identity(stored_config),
                "num_classes": num_classes,
                "world_size": world,
                "torch_rng": torch.get_rng_state()})

    # -- metrics files (rank 0)
    jl = csv_f = csv_w = tb = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if remote:  # a fresh process resumes from the store alone: its metrics files, as they are there
            for p in (run.metrics_jsonl, run.metrics_csv):
                if is_file(p):
                    fetch_local(p)
                else:
                    p.unlink(missing_ok=True)
        _metrics_truncate(out, step)  # rows a killed run logged after its checkpoint (or before its first)
        jl = open(run.metrics_jsonl, "a")
        new_csv = not run.metrics_csv.exists() or run.metrics_csv.stat().st_size == 0
        csv_f = open(run.metrics_csv, "a", newline="")
        csv_w = csv.DictWriter(csv_f, fieldnames=METRIC_FIELDS, lineterminator="\n")
        if new_csv:
            csv_w.writeheader()
        if cfg.tensorboard:
            tb = _tensorboard_writer(out / "tb", step)
    bar = None
    if master and progress:
        from tqdm import tqdm

        bar = tqdm(total=end, initial=step, unit="step", desc="train", dynamic_ncols=True)

    # -- the loop
    losses: list[tuple[int, float]] = []
    samples_per_step = cfg.batch_size * cfg.accum_steps * world
    t0 = t_log = time.monotonic()
    steps_since_log = 0
    last_loss: float | None = None
    train_model.train()
    try:
        # one stream across epochs: the next epoch's workers start before this one's last batches
        epoch0, within0 = divmod(step, per_epoch)
        batches = iter(EpochBatches(lcfg, epoch0, within0 * cfg.accum_steps, batches_per_epoch=per_epoch *
                                    cfg.accum_steps, limit=(end - step) * cfg.accum_steps,
                                    pin_memory=device.type == "cuda"))
        while step < end:
            epoch, within = divmod(step, per_epoch)
            while within < per_epoch and step < end:
                lr = lr_at(step, cfg, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.accum_steps):
                    x, cls, labels, probs = next(batches)
                    x, cls = normalize_on(x.to(device, non_blocking=True), lcfg), cls.to(device, non_blocking=True)
                    labels, probs = labels.to(device, non_blocking=True), probs.to(device, non_blocking=True)
                    sync = not ddp or micro == cfg.accum_steps - 1
                    with (contextlib.nullcontext() if sync else train_model.no_sync()):
                        with autocast:
                            logits = train_model(x)
                        loss = compute_loss(cfg, logits, cls, labels, probs) / cfg.accum_steps
                        loss.backward()
                    step_loss += loss.detach()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                step += 1
                within += 1
                steps_since_log += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == end:
                    if ddp:
                        torch.distributed.all_reduce(step_loss)
                        step_loss /= world
                    last_loss = float(step_loss)
                    if not math.isfinite(last_loss):
                        raise UserError(f"loss is {last_loss} at step {step}; lower --lr")
                    now = time.monotonic()
                    row = {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                           "samples_per_s": round(steps_since_log * samples_per_step / max(now - t_log, 1e-9), 2)}
                    t_log, steps_since_log = now, 0
                    losses.append((step, last_loss))
                    if master:
                        jl.write(json.dumps(row) + "\n")
                        jl.flush()
                        csv_w.writerow(row)
                        csv_f.flush()
                        if tb is not None:
                            for name in ("loss", "lr", "samples_per_s"):
                                tb.add_scalar(f"train/{name}", row[name], step)
                            tb.add_scalar("train/epoch", epoch, step)
                            tb.flush()
                    if bar is not None:
                        bar.set_postfix_str(f"loss {last_loss:.4f} lr {lr:.2e}", refresh=False)
                if step % cfg.ckpt_every == 0 and step < end:
                    checkpoint(ckpt_path)
        del batches
        if step > start_step or not is_file(ckpt_path):  # a resumed, finished run is left as it was
            checkpoint(ckpt_path)
        if step >= total and (step > start_step or not is_file(final_path)):
            checkpoint(final_path)
    finally:
        if bar is not None:
            bar.close()
        if jl is not None:
            jl.close()
            csv_f.close()
            upload_metrics()
        if tb is not None:
            tb.close()
            _neutral_event_names(out / "tb")
            if remote:
                _upload_tree(out / "tb")
        if ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    seconds = time.monotonic() - t0
    done = step - start_step
    return TrainSummary(
        output=display(out), steps=step, start_step=start_step, epochs=step / per_epoch, final_loss=last_loss,
        seconds=seconds, samples_per_second=done * samples_per_step / max(seconds, 1e-9),
        num_classes=num_classes, checkpoint=display(ckpt_path if step < total else final_path),
        losses=losses)
