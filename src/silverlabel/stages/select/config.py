"""The configuration and the summary of ``select`` (see :mod:`silverlabel.stages.select`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from silverlabel.errors import UserError
from silverlabel.options import cpu_count, opt, positive_int
from silverlabel.teachers.labelspace import space_names


@dataclass(frozen=True)
class SelectConfig:
    """Everything ``select`` needs (see the package docstring for the order of the rules)."""

    source: str = opt(positional=True, metavar="DATASET_OR_TABLE")
    output: str = opt(short="-o", metavar="SELECTION", required=True)
    labels_name: str | None = opt(None, "which labels/NAME of the dataset", flag="--labels", group="labels",
                                  default_help="default: the first")
    label: str = opt("auto", "top1: teacher's top-1 class; source: ImageFolder/.cls label", group="labels",
                     choices=("auto", "top1", "source", "none"), default_help="auto: top1 if labeled")
    min_prob: float | None = opt(None, "keep samples whose top-1 probability is >= P", type=float, group="labels")
    multi_label: bool = opt(False, "with --min-prob: keep every label >= P", action="store_true", group="labels")
    label_space: str | None = opt(None, "remap the labels to this space", choices=space_names, group="labels")
    rollup_depth: int | None = opt(None, "roll labels up to their WordNet ancestor at this depth", type=int,
                                   group="labels")
    rollup_to: str | None = opt(None, "roll labels up to the nearest ancestor listed (wnids)", metavar="FILE",
                                group="labels")
    allow_partial: bool = opt(False, "select from a dataset whose labels miss some shards or stopped at --limit "
                              "(their samples are left out; report.json lists them)", action="store_true",
                              group="labels")
    top_classes: int | None = opt(None, "keep the N largest classes", type=positive_int, metavar="N",
                                  group="classes and splits")
    val_per_class: int = opt(0, "validation samples per class", type=int, metavar="V", group="classes and splits",
                             default_help="")
    min_train_per_class: int = opt(0, "keep classes that still have T training samples after V validation ones",
                                   type=int, metavar="T", group="classes and splits", default_help="")
    fraction: float | None = opt(None, "subset of the training split (with --balanced)", type=float,
                                 group="classes and splits")
    balanced: bool = opt(False, "equal per class, remainder +1 for random classes", action="store_true",
                         group="classes and splits")
    keys_file: str | None = opt(None, "an official list (keys, file names or uids, one per line)",
                                group="classes and splits")
    uids: str | None = opt(None, "DataComp uids.npy (u8,u8) or uids.txt (32 hex a line)", group="uids and duplicates")
    dedupe: str | None = opt(None, "exact (sha256) or phash:D (pHash within Hamming distance D)",
                             group="uids and duplicates")
    exclude_near: str | None = opt(None, "drop samples near a reference dataset or hash list", metavar="REF",
                                   group="uids and duplicates")
    max_distance: int = opt(8, "distance for --exclude-near", type=int, group="uids and duplicates")
    seed: int = opt(0, "", type=int, group="classes and splits", default_help="")
    memory_limit: str = opt("4GB", "DuckDB memory limit; spills beyond it", group="run")
    threads: int = opt(default_factory=cpu_count, help="", type=positive_int, group="run", default_help="")

    def __post_init__(self) -> None:
        if self.label not in ("auto", "top1", "source", "none"):
            raise UserError(f"--label must be top1 or source, not {self.label!r}")
        if self.min_prob is not None and not 0 <= self.min_prob <= 1:
            raise UserError(f"--min-prob must be in 0..1, got {self.min_prob}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise UserError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.fraction is not None and not self.balanced:
            raise UserError("--fraction needs --balanced (the label-balanced tfds/SimCLR rule)")
        if self.rollup_depth is not None and self.rollup_to:
            raise UserError("use --rollup-depth or --rollup-to, not both")
        if self.dedupe is not None and self.dedupe != "exact" and not self.dedupe.startswith("phash:"):
            raise UserError(f"--dedupe must be exact or phash:D, not {self.dedupe!r}")
        for name in ("val_per_class", "min_train_per_class", "max_distance"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")

    def output_config(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("output", "memory_limit", "threads"):
            d.pop(k)
        return d


@dataclass
class SelectSummary:
    output: str
    rows: int
    splits: dict[str, int]
    classes: int
    removed: dict[str, int]
    seconds: float
    from_table: bool
