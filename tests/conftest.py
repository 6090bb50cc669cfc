"""Shared pytest fixtures and skips."""
import os

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ("fuse" in item.keywords or "interop" in item.keywords) and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root"))
