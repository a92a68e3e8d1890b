"""``silverlabel.options``: the CPU count every ``--workers``/``--threads`` default and every
auto-sized pool share."""

from __future__ import annotations

import os
from types import SimpleNamespace

from silverlabel import dedupe, options
from silverlabel.stages import train


def test_cpu_count_is_the_affinity_mask_where_there_is_one(monkeypatch):
    # a process pinned to 3 of a host's 64 cores (taskset, a container's cpuset, a batch slot)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert options.cpu_count() == 3
    assert dedupe._workers(None) == 3  # the same helper behind every auto-sized pool
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.loader_workers(-1, "cuda") == 2
    from silverlabel.stages.reinforce import resolve_replay_procs

    assert resolve_replay_procs(SimpleNamespace(replay_procs=-1, workers=1), "cuda") == 2  # 3 cores - 1
    # a platform without affinity masks (macOS, Windows): the host's count
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert options.cpu_count() == 64 and dedupe._workers(None) == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # os.cpu_count() may not know
    assert options.cpu_count() == 1


def test_the_config_defaults_use_it(monkeypatch):
    from silverlabel.stages.ingest import IngestConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert IngestConfig(sources=("x",), output="o").workers == 2
