"""``silverlabel build RECIPE.yaml``: a pipeline as data, each step rerun only when it must.

A recipe names its steps, in the order they run; each step is a stage and the fields of that
stage's config dataclass (``IngestConfig``, ``LabelConfig``, ... by their Python names)::

    out: ../examples-output/imagenet12k   # output root, relative to this file (--out overrides)
    vars:                                 # ${vars.NAME}; --set vars.pool=PATH overrides
      pool: ../demo-output/pool
    steps:
      sel:                                # a step: its name, its stage, its config fields
        stage: select                     # ingest label select shard reinforce train eval lowshot card script
        source: ${vars.pool}
        output: sel                       # output paths: relative to the output root
        top_classes: 8
      trainset:
        stage: shard
        selection: ${sel}                 # ${STEP}: that step's output, and a dependency on it
        output: trainset
        shards: {train: 4, validation: 1}
    smoke:                                # --smoke: overrides for a seconds-long run (runlocal)
      steps.trainset.shards: {train: 2, validation: 1}

``${STEP}`` is a step's output: the folder it writes (ingest, select, shard, reinforce,
train, lowshot), the dataset it labels (label), the JSON it writes (eval), the card (card),
the file a ``script`` step writes (``script: x.py``, ``args: [...]``, ``output: FILE``: the
recipe's own Python script). ``${out}`` is the output root. Relative input paths are relative
to the recipe file (a ``--set vars.NAME=PATH`` naming an existing path: to the current folder).
``--set KEY=VALUE`` overrides any dotted key (``steps.run.steps=3``; VALUE is YAML). Unknown
keys are errors; a ``run_*`` function's own options (``select``: ``engine``, ``workers``,
``ray_address``) may stand beside the config fields, and are no part of the key.

A step runs when it is new, its config or its inputs changed, or its outputs are gone;
otherwise it is skipped (``--force`` runs it anyway; ``--only STEP``, ``--from STEP`` choose
steps). Its key is a hash of its config (``output_config()`` where the stage has one: the
fields that change the output, not the worker counts) and of its inputs' identities: for an
earlier step, the identity of that step's output as recorded when it finished (the sha256 of
its manifest, run checkpoint or report); for any other path, the sha256 of its manifest
(``silverlabel.json``) or of the file (size and mtime above 64 MiB), or the sizes and mtimes
of a folder's files. The key goes to ``.build-STEP.json`` next to the step's outputs, written
atomically and last, each input named ``${out}/...`` or relative to the recipe
(:func:`shown_path`), never by where the build ran; a step whose outputs a previous build
made under another key has them removed before it reruns. ``--dry-run`` prints the plan and runs nothing.

    python -m silverlabel build examples/imagenet12k.yaml --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from silverlabel import fs
from silverlabel.dataset import Pool, file_digest, write_json_atomic
from silverlabel.errors import UserError
from silverlabel.log import progress_wanted, stage_progress

STATE_PREFIX = ".build-"  # .build-STEP.json: the step's key, written last
_HASH_WHOLE = 64 << 20  # files up to this size are hashed, larger ones keyed by size + mtime
_REF = re.compile(r"\$\{([^}]*)\}")


# ---------------------------------------------------------------------------------------
# the stages a step can be


@dataclass(frozen=True)
class StageKind:
    """How the build runner drives one stage: its config, its paths, and its ``run_*``."""

    module: str  # silverlabel.stages.X
    config: str  # its config dataclass
    run: str  # its public run function
    inputs: tuple[str, ...]  # config fields naming paths read (relative to the recipe)
    outputs: tuple[str, ...]  # config fields naming paths written (relative to the output root)
    product: Callable[[Any], Path]  # what ${STEP} names
    records: Callable[[Any], list[Path]]  # must exist when done; the first one's identity is the output's
    removes: Callable[[Any], list[Path]]  # what a rerun with another key deletes first
    runtime: tuple[str, ...] = ()  # fields left out of the key when there is no output_config()


def _p(v: Any) -> Path:
    return Path(v)


def _run_dir(run: str) -> Path:
    return Path(run) if Path(run).is_dir() or not Path(run).suffix else Path(run).parent


def _eval_json(cfg: Any) -> Path:
    return Path(cfg.out) if cfg.out else _run_dir(cfg.run) / f"eval-{cfg.split}.json"


def _lowshot_dir(cfg: Any) -> Path:
    return Path(cfg.out) if cfg.out else _run_dir(cfg.run) / "lowshot"


def _card_readme(cfg: Any) -> Path:
    return Path(cfg.output) if cfg.output else Path(cfg.dataset) / "README.md"


def _manifest(cfg: Any) -> list[Path]:
    return [Path(cfg.output) / "silverlabel.json"]


STAGES: dict[str, StageKind] = {
    "ingest": StageKind("ingest", "IngestConfig", "run_ingest", ("sources",), ("output",),
                        lambda c: _p(c.output), _manifest, lambda c: [_p(c.output)]),
    "label": StageKind("label", "LabelConfig", "run_label", ("dataset", "teachers"), (),
                       lambda c: _p(c.dataset),
                       lambda c: [Path(c.dataset) / "silverlabel.json", Pool(c.dataset).labels_dir(c.name)],
                       lambda c: [Pool(c.dataset).labels_dir(c.name)]),
    "select": StageKind("select", "SelectConfig", "run_select", ("source", "keys_file", "uids", "exclude_near"),
                        ("output",), lambda c: _p(c.output), _manifest, lambda c: [_p(c.output)]),
    "shard": StageKind("shard", "ShardConfig", "run_shard", ("selection",), ("output",),
                       lambda c: _p(c.output), lambda c: _manifest(c) + [Path(c.output) / "_info.json"],
                       lambda c: [_p(c.output)]),
    "reinforce": StageKind("reinforce", "ReinforceConfig", "run_reinforce", ("trainset", "teachers"), ("output",),
                           lambda c: _p(c.output), _manifest, lambda c: [_p(c.output)]),
    "train": StageKind("train", "TrainConfig", "run_train", ("trainset", "init"), ("output",),
                       lambda c: _p(c.output), lambda c: [Path(c.output) / "checkpoint-final.pt"],
                       lambda c: [_p(c.output)], runtime=("device", "num_workers", "ckpt_every", "log_every")),
    "eval": StageKind("evaluate", "EvalConfig", "run_eval", ("run", "trainset", "real_labels"), ("out",),
                      _eval_json, lambda c: [_eval_json(c)], lambda c: [], runtime=("device", "num_workers")),
    "lowshot": StageKind("lowshot", "LowShotConfig", "run_lowshot", ("run", "trainset"), ("out",),
                         _lowshot_dir, lambda c: [_lowshot_dir(c) / "lowshot.json"], lambda c: [],
                         runtime=("device", "num_workers")),
    "card": StageKind("card", "CardConfig", "run_card", ("dataset",), ("output", "html"),
                      _card_readme, lambda c: [_card_readme(c)] + ([Path(c.html) / "index.html"] if c.html else []),
                      lambda c: [], runtime=("threads",)),
    # not a stage: a Python script of the recipe's own (examples/teacher_label_sets.py)
    "script": StageKind("", "ScriptConfig", "run_script", ("script", "args"), ("output",),
                        lambda c: _p(c.output), lambda c: [_p(c.output)], lambda c: [_p(c.output)]),
}


@dataclass(frozen=True)
class ScriptConfig:
    """A ``script`` step: ``python SCRIPT ARGS...`` (SCRIPT relative to the recipe), which
    writes ``output``. Its inputs: the script and every argument that is an absolute path
    (``${STEP}`` is one) other than ``output``."""

    script: str
    output: str
    args: tuple[str, ...] = ()


def run_script(cfg: ScriptConfig) -> None:
    """Run the script with this Python; a failure is an error naming the script."""
    import subprocess

    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()  # our lines before the script's
    rc = subprocess.run([sys.executable, cfg.script, *map(str, cfg.args)]).returncode
    if rc != 0:
        raise UserError(f"{cfg.script} exited with status {rc}")


def _stage_api(kind: StageKind) -> tuple[type, Callable]:
    if not kind.module:
        return globals()[kind.config], globals()[kind.run]
    mod = importlib.import_module(f"silverlabel.stages.{kind.module}")
    return getattr(mod, kind.config), getattr(mod, kind.run)


_RUNNER_ARGS = {"progress", "log", "resume", "stop_after"}  # run_* arguments the runner sets itself


def _run_options(run: Callable) -> set[str]:
    """The ``run_*`` keyword arguments a step may set besides its config (select's ``engine``)."""
    return set(list(inspect.signature(run).parameters)[1:]) - _RUNNER_ARGS


def _call_stage(step: Step, progress: bool = False) -> Any:
    """Run one step's stage through its public ``run_*`` function and print its report;
    ``progress``: a bar of the stage's work, with its total and ETA where the stage knows them
    (:func:`silverlabel.log.stage_progress`, as the stage's own command draws it)."""
    stage, cfg = step.stage, step.config
    _, run = _stage_api(step.kind)
    if stage == "train":  # an interrupted build left a checkpoint: continue it
        return run(cfg, resume=(Path(cfg.output) / "checkpoint.pt").exists(), progress=False)
    if "progress" not in inspect.signature(run).parameters:
        result = run(cfg, **step.run_args)
    else:
        bar = stage_progress(stage, progress)
        try:
            result = run(cfg, progress=bar, **step.run_args)
        finally:
            bar.close()
    if stage == "eval":
        from silverlabel.stages.evaluate import format_report

        print(format_report(result))
    elif stage == "lowshot":
        from silverlabel.stages.lowshot import format_lowshot

        print(format_lowshot(result))
    return result


# ---------------------------------------------------------------------------------------
# the recipe


@dataclass
class Step:
    """One step of a recipe: its stage, its built config and what it reads."""

    name: str
    stage: str
    config: Any  # the stage's config dataclass
    deps: tuple[str, ...]  # earlier steps it refers to
    inputs: dict[str, list[str]]  # field -> paths read (steps' products included)
    run_args: dict[str, Any] = field(default_factory=dict)  # run_* options outside the config (not keyed)
    roots: tuple[str, str] = ("", "")  # (output root, recipe folder): what config_digest names paths against

    @property
    def kind(self) -> StageKind:
        return STAGES[self.stage]

    @property
    def product(self) -> Path:
        return self.kind.product(self.config)

    @property
    def state_path(self) -> Path:
        """``.build-STEP.json`` in the folder of the step's first record (a label step's: the dataset)."""
        return self.kind.records(self.config)[0].parent / f"{STATE_PREFIX}{self.name}.json"


@dataclass
class Recipe:
    """A loaded recipe: its file, output root and steps in order."""

    path: Path
    out: Path
    steps: list[Step]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise UserError(f"{self.path}: no step named {name!r} (have: {', '.join(s.name for s in self.steps)})")


def _set_dotted(doc: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = doc
    for p in parts[:-1]:
        nxt = node.get(p) if isinstance(node, dict) else None
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{where}: {key}: {p!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def parse_set(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``; VALUE is read as YAML.

    >>> parse_set("steps.run.steps=3"), parse_set("vars.pool=data/pool")
    (('steps.run.steps', 3), ('vars.pool', 'data/pool'))
    """
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: use KEY=VALUE (e.g. steps.train.steps=3)")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_recipe(path: str | os.PathLike, out: str | None = None, overrides: Sequence[str] = (),
                smoke: bool = False) -> Recipe:
    """Read a recipe, apply ``smoke:`` (with ``smoke``) and ``--set`` overrides, build every
    step's config.

    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "r.yaml").write_text("steps:\\n  sel: {stage: select, source: pool, output: sel}\\n")
    >>> r = load_recipe(d / "r.yaml", out=str(d / "out"))
    >>> r.steps[0].config.output == str(d / "out" / "sel"), r.steps[0].config.source == str(d / "pool")
    (True, True)
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), dict) or not doc["steps"]:
        raise UserError(f"{path}: a recipe is a mapping with a 'steps' mapping (name: {{stage: ..., ...}})")
    unknown = set(doc) - {"out", "vars", "steps", "smoke", "description"}
    if unknown:
        raise UserError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                        "(out, vars, steps, smoke, description)")
    if smoke:
        for key, value in (doc.get("smoke") or {}).items():
            _set_dotted(doc, str(key), value, f"{path}: smoke")
    for text in overrides:
        key, value = parse_set(text)
        if key.startswith("vars.") and isinstance(value, str) and not os.path.isabs(value) and os.path.exists(value):
            value = os.path.abspath(value)  # a path typed on the command line: from the current folder
        _set_dotted(doc, key, value, f"{path}: --set")
    base = path.resolve().parent
    root = Path(out).resolve() if out else (base / str(doc.get("out") or ".")).resolve()
    variables = doc.get("vars") or {}
    steps: list[Step] = []
    for name, body in doc["steps"].items():
        steps.append(_build_step(str(name), body, variables, {s.name: s for s in steps}, base, root, path))
    return Recipe(path, root, steps)


def _build_step(name: str, body: Any, variables: Mapping, earlier: Mapping[str, Step], base: Path, root: Path,
                path: Path) -> Step:
    where = f"{path}: step {name!r}"
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name) or name in ("out", "vars"):
        raise UserError(f"{where}: a step name is a word (letters, digits, '_', '-'), not out or vars")
    if not isinstance(body, dict) or "stage" not in body:
        raise UserError(f"{where}: give its stage ({', '.join(STAGES)}) and config fields")
    stage = body["stage"]
    if stage not in STAGES:
        raise UserError(f"{where}: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    kind = STAGES[stage]
    cls, run = _stage_api(kind)
    deps: list[str] = []

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REF.fullmatch(value)

        def lookup(ref: str) -> Any:
            if ref == "out":
                return str(root)
            if ref.startswith("vars."):
                if ref[5:] not in variables:
                    raise UserError(f"{where}: ${{{ref}}}: no such variable (vars: {', '.join(variables) or 'none'})")
                return variables[ref[5:]]
            if ref not in earlier:
                raise UserError(f"{where}: ${{{ref}}}: no earlier step named {ref!r} "
                                "(a step refers to steps above it, or to ${vars.NAME})")
            if ref not in deps:
                deps.append(ref)
            return str(earlier[ref].product)

        if whole:
            return lookup(whole.group(1))
        return _REF.sub(lambda m: str(lookup(m.group(1))), value)

    fields = {k: resolve(v) for k, v in body.items() if k != "stage"}
    for f in kind.inputs + kind.outputs:
        if f in fields and f not in ("teachers", "args"):
            fields[f] = _relative_to(fields[f], root if f in kind.outputs else base)
    if isinstance(fields.get("teachers"), list):
        fields["teachers"] = [_teacher_paths(t, base) for t in fields["teachers"]]
    options = _run_options(run) - {f.name for f in dataclasses.fields(cls)}
    run_args = {k: fields.pop(k) for k in list(fields) if k in options}
    config = build_config(cls, fields, where)
    inputs = {f: [p for p in _paths_of(getattr(config, f))
                  if f != "args" or (os.path.isabs(p) and p != config.output)]  # a script's path arguments
              for f in kind.inputs if getattr(config, f, None) is not None}
    return Step(name, stage, config, tuple(deps), inputs, run_args, (str(root), str(base)))


def _relative_to(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_relative_to(v, base) for v in value]
    if not isinstance(value, str) or fs.is_remote(value) or os.path.isabs(value):
        return value
    return str(base / value)


def _teacher_paths(t: Any, base: Path) -> Any:
    if isinstance(t, dict) and t.get("checkpoint"):
        return dict(t, checkpoint=_relative_to(t["checkpoint"], base))
    return t


def _paths_of(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_of(v)]
    if dataclasses.is_dataclass(value):  # a TeacherSpec: its checkpoint file
        return [value.checkpoint] if getattr(value, "checkpoint", None) else []
    return [str(value)]


# ---------------------------------------------------------------------------------------
# a config dataclass from a mapping


def build_config(cls: type, fields: Mapping[str, Any], where: str) -> Any:
    """Build the dataclass ``cls`` from a mapping of its field names, nested dataclasses and
    tuples included; an unknown key is a :class:`UserError` naming ``where`` and the key.

    >>> from silverlabel.stages.select import SelectConfig
    >>> build_config(SelectConfig, {"source": "p", "output": "s", "min_prob": "1e-1"}, "step x").min_prob
    0.1
    >>> build_config(SelectConfig, {"source": "p", "output": "s", "top_class": 3}, "step x")
    Traceback (most recent call last):
    silverlabel.errors.UserError: step x: unknown key 'top_class' for select (SelectConfig); did you mean top_classes?
    """
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation only its module's type checker sees: take values as given
        hints = {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in fields.items():
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            stage = next((s for s, k in STAGES.items() if k.config == cls.__name__), cls.__name__)
            raise UserError(f"{where}: unknown key {key!r} for {stage} ({cls.__name__})"
                            + (f"; did you mean {close[0]}?" if close else ""))
        kwargs[key] = _coerce(hints.get(key, Any), value, f"{where}: {key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """YAML values to the field's type: lists to tuples, mappings to dataclasses, '1e-3' to a float."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in options:  # the first option the value fits
            if _fits(a, value):
                return _coerce(a, value, where)
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if tp is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{where}: not a number: {value!r}") from None
    if origin is tuple:
        args = typing.get_args(tp)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not args or args[-1] is Ellipsis:  # tuple[X, ...]: every item an X
            return tuple(_coerce(args[0] if args else Any, v, where) for v in items)
        return tuple(_coerce(args[min(i, len(args) - 1)], v, where) for i, v in enumerate(items))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, str) and hasattr(tp, "parse"):  # a TeacherSpec from its name
            return tp.parse(value)
        if isinstance(value, Mapping):
            return build_config(tp, value, where)
    return value


def _fits(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if tp is float:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (Mapping, str))
    return isinstance(value, origin) if isinstance(origin, type) else True


# ---------------------------------------------------------------------------------------
# keys: what a step's output depends on


def path_identity(path: str | os.PathLike) -> str:
    """What a path's content is, cheaply: a manifest's or small file's sha256, a big file's size
    and mtime, a folder's file sizes and mtimes; a URL or a pattern is its own identity."""
    p = Path(path)
    if fs.is_remote(path):
        return fs.public(str(path))
    if p.is_file():
        st = p.stat()
        if st.st_size <= _HASH_WHOLE:
            return "sha256:" + file_digest(p)
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        if (p / "silverlabel.json").is_file():
            return "manifest:" + file_digest(p / "silverlabel.json")
        h = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                st = os.stat(os.path.join(dirpath, fn))
                h.update(f"{os.path.relpath(os.path.join(dirpath, fn), p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "tree:" + h.hexdigest()
    if not any(c in str(path) for c in "*?{["):
        return "missing"
    import glob

    from silverlabel.sources.tars import expand_braces

    files = sorted({f for pat in expand_braces(str(path)) for f in glob.glob(pat)})
    h = hashlib.sha256()  # a pattern: what it matches now (names relative to its folder), not where
    for f in files:
        h.update(f"{os.path.relpath(f, p.parent)}\0{path_identity(f)}\n".encode())
    return "pattern:" + h.hexdigest()


def shown_path(path: str, recipe: Recipe) -> str:
    """How the build state names an input path: ``${out}/...`` under the output root, relative
    to the recipe's folder under it, a URL as given; else its base name. Never where the
    output root or the recipe lie, so a moved build keeps its state."""
    if fs.is_remote(path):
        return fs.public(path)
    p = os.path.abspath(path)
    return _shown(p, str(recipe.out), str(recipe.path.resolve().parent)) or os.path.basename(p) or p


def _shown(path: str, out: str, base: str) -> str | None:
    """``path`` (absolute) as ``${out}/REL`` under ``out``, as REL under ``base``; else None."""
    for root, shown in ((out, "${out}"), (base, "")):
        rel = os.path.relpath(path, os.path.abspath(root))
        if rel != ".." and not rel.startswith(".." + os.sep):
            rel = Path(rel).as_posix()
            return f"{shown}/{rel}" if shown and rel != "." else (shown or rel)
    return None


def config_digest(step: Step) -> str:
    """sha256 of the step's stage and the config fields that change its output, each path
    under the output root or the recipe's folder named relative to it (:func:`shown_path`):
    a build moved whole (recipe, inputs and outputs) is still up to date."""
    cfg = step.config
    if hasattr(cfg, "output_config"):
        doc = cfg.output_config()
    else:
        doc = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in step.kind.runtime}
    out, base = step.roots

    def located(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: located(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [located(x) for x in v]
        if isinstance(v, str) and out and os.path.isabs(v):
            shown = _shown(v, out, base)
            return shown if shown is not None else v
        return v

    text = json.dumps({"stage": step.stage, "config": located(doc)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_state(step: Step) -> dict[str, Any] | None:
    try:
        return json.loads(step.state_path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# plan and build


@dataclass
class StepPlan:
    """What the build does with one step, and why."""

    step: Step
    action: str  # run | skip
    reason: str  # new | config changed | input changed (...) | outputs missing | up to date | forced
    inputs: dict[str, str] | None = None  # path -> identity (None: known only after an earlier step runs)


@dataclass
class BuildSummary:
    """Which steps ran and which were up to date."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _input_ids(step: Step, recipe: Recipe, pending: set[str]) -> dict[str, str] | None:
    """Identities of a step's inputs; None when an earlier step that feeds it will run first."""
    by_product = {str(recipe.step(d).product): d for d in step.deps}
    ids: dict[str, str] = {}
    for fld, paths in step.inputs.items():
        for p in paths:
            key = f"{fld}:{shown_path(p, recipe)}"
            while key in ids:  # two inputs of one base name outside the recipe's folders
                key += "+"
            dep = next((d for prod, d in by_product.items() if p == prod or p.startswith(prod + os.sep)), None)
            if dep is None:
                ids[key] = path_identity(p)
                continue
            if dep in pending:
                return None
            state = read_state(recipe.step(dep))
            if state is None:
                raise UserError(f"step {step.name!r} needs step {dep!r}, which has not been built "
                                f"(run without --only/--from, or build {dep!r} first)")
            ids[key] = f"step:{dep}:{state['output']}"
    return ids


def _decide(step: Step, recipe: Recipe, pending: set[str], force: bool) -> StepPlan:
    state = read_state(step)
    inputs = _input_ids(step, recipe, pending)
    if force:
        return StepPlan(step, "run", "forced", inputs)
    if state is None:
        return StepPlan(step, "run", "new", inputs)
    if state.get("config") != config_digest(step):
        return StepPlan(step, "run", "config changed", inputs)
    if inputs is None:
        changed = [d for d in step.deps if d in pending]
        return StepPlan(step, "run", f"input changed ({', '.join(changed)} reruns)", inputs)
    if state.get("inputs") != inputs:
        old = state.get("inputs") or {}
        which = sorted({v.split(":")[1] if v.startswith("step:") else k.split(":", 1)[0]  # a step, or a field
                        for k in set(old) | set(inputs) if old.get(k) != inputs.get(k)
                        for v in [inputs.get(k) or old.get(k)]})
        return StepPlan(step, "run", f"input changed ({', '.join(which)})", inputs)
    missing = [str(p) for p in step.kind.records(step.config) if not p.exists()]
    if missing:
        return StepPlan(step, "run", f"outputs missing ({missing[0]})", inputs)
    return StepPlan(step, "skip", "up to date", inputs)


def _selected(recipe: Recipe, only: Sequence[str] = (), from_step: str | None = None) -> list[Step]:
    for name in list(only) + ([from_step] if from_step else []):
        recipe.step(name)  # names must exist
    if only:
        return [s for s in recipe.steps if s.name in only]
    if from_step:
        names = [s.name for s in recipe.steps]
        return recipe.steps[names.index(from_step):]
    return list(recipe.steps)


def plan(recipe: Recipe, only: Sequence[str] = (), from_step: str | None = None,
         force: bool = False) -> list[StepPlan]:
    """What :func:`build` would do, step by step, without running anything."""
    pending: set[str] = set()
    out = []
    for step in _selected(recipe, only, from_step):
        p = _decide(step, recipe, pending, force)
        if p.action == "run":
            pending.add(step.name)
        out.append(p)
    return out


def format_plan(plans: Sequence[StepPlan]) -> str:
    """One line per step: name, stage, action and why."""
    width = max((len(p.step.name) for p in plans), default=4)
    return "\n".join(f"  {p.step.name:<{width}}  {p.step.stage:<9}  {'run ' if p.action == 'run' else 'skip'}  "
                     f"{p.reason}" for p in plans)


def build(recipe: Recipe, only: Sequence[str] = (), from_step: str | None = None, force: bool = False,
          log: Callable[[str], None] = print, progress: bool = False) -> BuildSummary:
    """Run the steps that are new or whose config or inputs changed, in order; skip the rest.
    ``progress``: draw each step's progress bar on stderr (see :func:`_call_stage`).

    A step that ran records its key in ``.build-STEP.json`` (atomically, after its outputs).
    """
    t0 = time.monotonic()
    summary = BuildSummary()
    pending: set[str] = set()
    for step in _selected(recipe, only, from_step):
        p = _decide(step, recipe, pending, force)
        if p.action == "skip":
            log(f"build: {step.name} ({step.stage}): up to date")
            summary.skipped.append(step.name)
            continue
        inputs = p.inputs if p.inputs is not None else _input_ids(step, recipe, set())
        _clear(step, recipe)
        log(f"build: {step.name} ({step.stage}): running ({p.reason})")
        t1 = time.monotonic()
        _call_stage(step, progress)
        records = step.kind.records(step.config)
        missing = [str(r) for r in records if not r.exists()]
        if missing:
            raise RuntimeError(f"step {step.name!r} ({step.stage}) finished without writing {missing[0]}")
        write_json_atomic(step.state_path, {
            "step": step.name, "stage": step.stage, "config": config_digest(step), "inputs": inputs,
            "output": path_identity(records[0]), "seconds": round(time.monotonic() - t1, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        log(f"build: {step.name} ({step.stage}): done in {time.monotonic() - t1:.1f} s -> {step.product}")
        summary.ran.append(step.name)
    summary.seconds = time.monotonic() - t0
    return summary


def _clear(step: Step, recipe: Recipe) -> None:
    """Before a rerun: remove what an earlier build of this step made under another key.
    Only outputs this runner made (the state file proves it) are removed, never the output
    root or a folder holding it or the recipe; without a state file, the stage resumes or
    refuses by its own rules."""
    state_path = step.state_path
    if not state_path.exists():
        return
    keep = {recipe.out.resolve(), *recipe.out.resolve().parents, *recipe.path.resolve().parents}
    for p in step.kind.removes(step.config):
        if p.resolve() in keep:
            raise UserError(f"step {step.name!r}: its output {p} holds the output root or the recipe; "
                            "give the step a folder of its own")
    state_path.unlink()
    for p in step.kind.removes(step.config):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ---------------------------------------------------------------------------------------
# the command


def add_build_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``silverlabel build`` on an argparse subparsers object.

    >>> ap = argparse.ArgumentParser(); sub = ap.add_subparsers()
    >>> _ = add_build_parser(sub)
    >>> ap.parse_args(["build", "r.yaml", "--dry-run"]).dry_run
    True
    """
    p = subparsers.add_parser(
        "build",
        help="run a recipe (the stages and their configs in one YAML file), redoing only what changed",
        description="Run the steps of a recipe in order. A step reruns only when its config or its inputs "
        "changed since the last build (its key is kept in .build-STEP.json next to its outputs); "
        "a second build with nothing changed does nothing.",
        epilog="examples:\n"
        "  silverlabel build examples/imagenet12k.yaml --dry-run     # the plan: what would run, and why\n"
        "  silverlabel build examples/imagenet12k.yaml --out runs/12k --set vars.pool=data/pool\n"
        "  silverlabel build examples/coyo_vit.yaml --smoke          # the recipe's scaled-down smoke run\n"
        "  silverlabel build examples/coyo_vit.yaml --from finetune  # that step and the ones after it\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="recipe file (YAML)")
    p.add_argument("--out", metavar="DIR", help="output root (default: the recipe's 'out', relative to it)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (which steps would run, and why)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. steps.train.steps=3 or vars.pool=data/pool (repeatable)")
    p.add_argument("--smoke", action="store_true", help="apply the recipe's 'smoke' overrides (a seconds-long run)")
    p.add_argument("--only", action="append", default=[], metavar="STEP", help="run only this step (repeatable)")
    p.add_argument("--from", dest="from_step", metavar="STEP", help="start at this step")
    p.add_argument("--force", action="store_true", help="rerun the chosen steps even when up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)
    return p


def cmd_build(args: argparse.Namespace) -> int:
    """``silverlabel build``: load, plan, and (unless ``--dry-run``) build."""
    if not os.path.isfile(args.recipe):
        raise UserError(f"{args.recipe}: no such recipe file")
    recipe = load_recipe(args.recipe, out=args.out, overrides=args.overrides, smoke=args.smoke)
    plans = plan(recipe, only=args.only, from_step=args.from_step, force=args.force)
    print(f"silverlabel build: {recipe.path} -> {recipe.out}")
    print(format_plan(plans))
    if args.dry_run:
        return 0
    bars = progress_wanted(args.no_progress, getattr(args, "quiet", False), getattr(args, "progress", False))
    s = build(recipe, only=args.only, from_step=args.from_step, force=args.force, progress=bars)
    print(f"silverlabel build: {len(s.ran)} step(s) ran, {len(s.skipped)} up to date, {s.seconds:.1f} s; "
          f"outputs in {recipe.out}")
    return 0
