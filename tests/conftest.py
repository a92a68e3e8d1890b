"""Markers: ``slow`` runs only with SILVERLABEL_SLOW=1; ``gpu`` only where CUDA is visible."""

from __future__ import annotations

import os

import pytest

# The loopback servers the tests start are reached directly, whatever proxy the machine that
# runs the tests is configured with (tests/test_proxy.py sets its own, per test); cleared here
# so the stages' subprocesses inherit the clean environment too.
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_var, None)


def pytest_collection_modifyitems(config, items):
    slow_ok = os.environ.get("SILVERLABEL_SLOW") == "1"
    gpu_ok = None
    for item in items:
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow: set SILVERLABEL_SLOW=1"))
        if "gpu" in item.keywords:
            if gpu_ok is None:
                try:
                    import torch

                    gpu_ok = torch.cuda.is_available()
                except Exception:
                    gpu_ok = False
            if not gpu_ok:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
