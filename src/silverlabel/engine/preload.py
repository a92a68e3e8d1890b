"""What the local engine's fork server imports once, before it forks any worker.

:class:`silverlabel.engine.local.LocalEngine` starts its worker processes from a
``multiprocessing`` fork server: a fresh interpreter that imports this module (and the
unit function's module), then forks one child per worker. The children start with these
imports done, instead of each paying them again (numpy, pyarrow, OpenCV, Pillow's format
plugins: about 0.2 s of CPU per worker). pandas is not imported here: pyarrow imports it
(~0.2 s) the first time it converts Python objects to an array, which ``ingest``'s workers
never do (:func:`silverlabel.formats.tables.column_array`); for the other stages the server
imports it too (:func:`silverlabel.engine.local.preload_modules`).

What this module may do, because every worker of every stage is forked from the result:

* no threads: a fork copies only the forking thread, so a lock another thread holds stays
  held forever in the child. numpy's OpenBLAS gets one thread (``OPENBLAS_NUM_THREADS``,
  the user's setting wins; the workers are the parallelism), and the jemalloc that pyarrow
  bundles starts no background thread (``JE_ARROW_MALLOC_CONF``; pyarrow allocates with
  mimalloc by default, jemalloc is idle);
* no CUDA: a CUDA context does not survive a fork, and GPU stages (label, reinforce) run
  their workers from the same server; nothing here imports torch;
* no state read from the environment that a worker would need fresh: the server lives as
  long as the driver and keeps the environment it started with, while a worker takes the
  driver's current one (:func:`silverlabel.engine.local._init_worker`). So nothing here
  reads credentials, proxies or endpoints (fsspec, for instance, reads its ``FSSPEC_*``
  settings when imported: it is not imported here).

Each import is optional: a missing package is skipped (a worker then imports what it needs,
as it would without a fork server).
"""

from __future__ import annotations

import importlib
import os

#: Set here (with ``setdefault``) before numpy and pyarrow load, in the server only; a
#: worker's environment is replaced by the driver's (see the module docstring).
SERVER_ENVIRONMENT = {
    "OPENBLAS_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
}

#: Imported in order; a module that is not installed is skipped. The last ones are what a
#: worker imports as it starts (the pool's machinery, its log handler, hostnames' codec).
MODULES = ("numpy", "pyarrow", "pyarrow.parquet", "cv2", "simplejpeg", "PIL.Image",
           "concurrent.futures.process", "multiprocessing.synchronize", "logging.handlers", "encodings.idna",
           "silverlabel.engine.local")

#: What was imported (for tests and debugging).
loaded: list[str] = []


def _preload() -> None:
    for name, value in SERVER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        loaded.append(name)
    if "PIL.Image" in loaded:
        from PIL import Image

        Image.preinit()  # the common format plugins, which the first Image.open would load


_preload()
