"""Session-wide test settings."""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE_ENV = "MEGATRON_SYNE_CACHE_DIR"


def pytest_configure(config) -> None:
    # Tests never write to the user's cache (~/.cache/megatron-syne): parsed tokenizer tables
    # go to a directory of this session, which subprocess tests inherit.
    if _CACHE_ENV not in os.environ:
        config._syne_cache_dir = tempfile.mkdtemp(prefix="megatron-syne-test-cache-")
        os.environ[_CACHE_ENV] = config._syne_cache_dir


def pytest_unconfigure(config) -> None:
    directory = getattr(config, "_syne_cache_dir", None)
    if directory is not None:
        os.environ.pop(_CACHE_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
