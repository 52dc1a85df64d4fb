"""Shared pytest set-up. Fixture modules live in tests/fixtures/ and are listed here.

COLDSTART_STRICT=1 (what `make test` sets, after scripts/setup.sh has installed every tool the
tests use) turns a skipped test into a failed one, unless it is marked ``may_skip`` (it depends on
the host: a GPU driver, a filesystem feature): a skip there means the set-up is broken, and a
suite that went green by skipping would hide it.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures.rootfs",
    "tests.fixtures.seaweed",
    "tests.fixtures.mount",
    "tests.fixtures.registry",
]

STRICT = os.environ.get("COLDSTART_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if (STRICT and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("may_skip") is None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under COLDSTART_STRICT=1 (scripts/setup.sh installs what it needs): {reason}"
