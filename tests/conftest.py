"""Shared fixtures and the BPF test policy.

Tests marked ``bpf`` need root and a kernel that loads our programs. Where that
is missing they skip with the reason — except under ``CI=true``, where a BPF
test that cannot run *fails*: CI must never pass by skipping the real tests.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

IN_CI = os.environ.get("CI") == "true"


def bpf_unavailable_reason() -> str | None:
    """Why BPF tests cannot run here (the product's own check), or None if they can."""
    from bpf.environment import find_missing_prerequisite

    return find_missing_prerequisite()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("bpf") is None:
            continue
        if not IN_CI:
            item.add_marker(pytest.mark.skip(reason=f"BPF test skipped outside CI: {reason}"))


@pytest.fixture(autouse=True)
def _fail_bpf_in_ci(request: pytest.FixtureRequest) -> None:
    """Under CI=true a BPF test that cannot run is a failure, not a skip."""
    if IN_CI and request.node.get_closest_marker("bpf") is not None:
        reason = bpf_unavailable_reason()
        if reason is not None:
            pytest.fail(f"BPF test cannot run in CI: {reason}", pytrace=False)


@pytest.fixture
def unique_name() -> Iterator[str]:
    """A short unique name for netns, veth and pinned maps (IFNAMSIZ is 16)."""
    yield "bp" + uuid.uuid4().hex[:8]


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture_log() -> Iterator[Callable[[str], list[logging.LogRecord]]]:
    """``capture_log("bpfpipe.sampler")``: the records that logger emits at INFO and
    above during the test, whatever the CLI did to propagation."""
    attached: list[tuple[logging.Logger, logging.Handler, int]] = []

    def capture(name: str) -> list[logging.LogRecord]:
        records: list[logging.LogRecord] = []
        logger = logging.getLogger(name)
        handler = _ListHandler(records)
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return records

    yield capture
    for logger, handler, level in reversed(attached):
        logger.removeHandler(handler)
        logger.setLevel(level)
