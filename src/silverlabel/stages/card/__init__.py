"""``silverlabel card``: a dataset card (``README.md``), plots and a static HTML report.

The card is written in the Hugging Face dataset-card form (YAML front matter, then the
usual sections) from what silverlabel knows about a dataset: the manifests along its
lineage (ingest -> label -> select -> shard) and its tables. Any silverlabel directory
works:

* an ingested (and labeled) pool: statuses, image sizes, the teacher's labels;
* a selection: its rows, classes.json, report.json (what each rule removed) and
  duplicates.parquet (which near-duplicates were removed), plus the pool it came from;
* a training set (``shard`` output, ``_info.json``): its splits and shards, plus the whole
  chain above it. When the selection it came from is gone, the per-sample facts are read
  from the shards' ``.json`` members instead.

Outputs::

    DATASET/README.md            the card (or -o PATH)
    DATASET/card/*.png           plots: class frequency, top-1 probability, labels per image
                                 against threshold, image sizes, ingest statuses
    DATASET/card/card.json       every number the card states, machine-readable
    HTML_DIR/index.html          with --html: a self-contained report (no server, no network)
    HTML_DIR/thumbs/*.jpg        one sprite of small thumbnails per class / group
    HTML_DIR/plots/*.png         copies of the plots

DATASET and ``-o`` may be URLs of any fsspec store (issue 16): the dataset's manifests and
tables (and its parents') are mirrored into this process's staging folder
(:func:`~silverlabel.stages.card.lineage.mirror_tables`; its tars are read by range), and the
README, plots and ``card.json`` are uploaded as each closes; they are the same bytes as for
the dataset on disk. ``--html`` is a local folder.

One module per job: ``lineage`` (what the directory is and what is above it), ``facts`` (DuckDB
views over the tables and every number), ``plots``, ``markdown`` (the README), ``hub`` (what
the Hugging Face Hub reads: ``configs``/``dataset_info``, and the merge that keeps a user's
edits on a rerun) and ``report`` (the HTML folder). ``run_card`` runs them in that order.

    >>> run_card(CardConfig("data/trainset", html="data/report")).readme  # doctest: +SKIP
    'data/trainset/README.md'
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from silverlabel.dataset import (Pool, atomic_write, check_target, check_writable, display, local_target, url_of,
                                 write_json_atomic)
from silverlabel.engine import Report
from silverlabel.errors import UserError
from silverlabel.log import phase
from silverlabel.options import cpu_count, opt, positive_int
from silverlabel.stages.card.facts import COYO_THRESHOLDS, CURVE_THRESHOLDS, Facts, brace_pattern
from silverlabel.stages.card.hub import hub_metadata
from silverlabel.stages.card.lineage import Lineage, resolve_lineage
from silverlabel.stages.card.markdown import compact_json, render_card, size_category
from silverlabel.stages.card.plots import PLOT_TITLES, write_plots
from silverlabel.stages.card.report import write_report

log = logging.getLogger(__name__)

__all__ = ["CARD_DIR", "COYO_THRESHOLDS", "CURVE_THRESHOLDS", "PLOT_TITLES", "README", "CardConfig", "CardSummary",
           "Facts", "Lineage", "brace_pattern", "compact_json", "render_card",
           "resolve_lineage", "run_card", "size_category", "write_plots", "write_report"]

CARD_DIR = "card"
README = "README.md"


@dataclass(frozen=True)
class CardConfig:
    """Everything ``card`` needs."""

    dataset: str = opt(help="ingested pool, selection or training set", positional=True, metavar="DATASET")
    output: str | None = opt(None, "card path; plots go next to it", short="-o", metavar="README",
                             default_help="default DATASET/README.md")  # plots go next to it in card/
    html: str | None = opt(None, "also write the HTML report into DIR (DIR/index.html)", metavar="DIR")
    plots: bool = opt(True, "no PNG plots", flag="--no-plots", action="store_false", default_help="")
    pretty_name: str | None = opt(None, "pretty_name of the card", flag="--name",
                                  default_help="default: the card's current pretty_name, else the dataset's name")
    license: str | None = opt(None, "license id for the front matter (a Hub license id: cc-by-4.0, mit, other, ...)",
                              default_help="default: the card's current license, else other")
    task_categories: tuple[str, ...] | None = opt(
        None, "task_categories of the front matter", nargs="+", metavar="TASK",
        default_help="default: the card's current ones, else image-classification")
    per_class: int = opt(8, "thumbnails per class in the report", type=int, metavar="K")
    max_classes: int = opt(10_000, "classes shown, largest first", type=int, metavar="N")  # with a grid in the report
    least_confident: int = opt(48, "least confident samples shown", type=int, metavar="N")
    max_clusters: int = 200  # near-duplicate clusters shown
    failures_per_status: int = 20
    thumb_size: int = opt(96, "thumbnail size", type=int, metavar="PX")
    threads: int = opt(default_factory=cpu_count, help="", type=positive_int, default_help="")

    def __post_init__(self) -> None:
        for name in ("per_class", "max_classes", "least_confident", "max_clusters", "failures_per_status"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        if self.task_categories is not None:
            object.__setattr__(self, "task_categories", tuple(self.task_categories))
        if not 16 <= self.thumb_size <= 512:
            raise UserError(f"--thumb-size must be in 16..512, got {self.thumb_size}")


@dataclass
class CardSummary:
    readme: str
    kind: str
    samples: int
    classes: int
    splits: dict[str, int]
    plots: list[str]
    report: str | None
    thumbnails: int
    seconds: float
    notes: list[str]


def _read_card(readme: Path) -> str | None:
    """The card already at ``readme`` (None: none yet)."""
    try:
        return readme.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise UserError(f"{readme}: not a UTF-8 text file; move it away to write a new card") from None


def _labels_names(lin: Lineage) -> list[str]:
    """A pool's labels sets that have tables (each its own Hub config)."""
    if lin.kind != "pool":
        return []
    pool = Pool(lin.root)
    return [n for n in pool.labels_names() if pool.labels_files(n)]


def run_card(cfg: CardConfig, progress: Report | None = None) -> CardSummary:
    """Write the card (and plots, and with ``cfg.html`` the report) of ``cfg.dataset``;
    ``progress`` ticks once per step done (facts, plots, card, report)."""
    import duckdb

    t0 = time.monotonic()
    steps = 2 + bool(cfg.plots) + bool(cfg.html)

    def step(done: str) -> None:
        log.info("card: %s (%.1f s)", done, time.monotonic() - t0)
        if progress is not None:
            progress(1, 1)
    if cfg.html is not None and url_of(cfg.html) is not None:
        raise UserError(f"--html {display(cfg.html)}: the HTML report is written to a local folder; give one")
    check_target(cfg.html, "--html", folder=True)
    if cfg.output is not None:
        check_writable(cfg.output)
    lin = resolve_lineage(cfg.dataset)
    readme = local_target(cfg.output) if cfg.output else lin.root / README  # a URL's: its staging path, uploaded
    if readme.is_dir():
        readme = readme / README
    card_dir = readme.parent / CARD_DIR
    report, n_thumbs = None, 0
    with tempfile.TemporaryDirectory(prefix="silverlabel-card-") as tmp:
        # settings as connection options, not SQL text: the temporary folder's path may hold any character
        with duckdb.connect(config={"temp_directory": tmp, "threads": max(1, cfg.threads)}) as con:
            phase(progress, "card", steps, "step")
            facts = Facts(lin, cfg, con, Path(tmp))
            d = facts.compute()
            step("facts computed")
            plots = write_plots(d, card_dir) if cfg.plots else []
            if cfg.plots:
                step(f"{len(plots)} plots written")
            old = _read_card(readme)
            # data_files are relative to the README's folder: none for a card written elsewhere
            in_root = readme.parent.resolve() == lin.root.resolve()
            hub = hub_metadata(lin.kind, lin.root, info=getattr(facts, "info", None), classes_doc=facts.classes_doc,
                               labels=_labels_names(lin), notes=d["notes"]) if in_root else {}
            with atomic_write(readme) as f:
                f.write(render_card(facts, plots, readme, old, hub).encode())
            write_json_atomic(card_dir / "card.json", {k: v for k, v in d.items() if k != "sizes"})
            step("card written")
            if cfg.html:
                n_thumbs = write_report(facts, Path(cfg.html), plots)
                report = str(Path(cfg.html) / "index.html")
                step(f"report written ({n_thumbs} thumbnails)")
    return CardSummary(display(readme), lin.kind, d["samples"], d["num_classes"],
                       {s["name"]: s["samples"] for s in d["splits"]}, [display(p) for p in plots], report, n_thumbs,
                       time.monotonic() - t0, d["notes"])
