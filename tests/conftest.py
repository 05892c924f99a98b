"""Shared fixtures: real OpenSSH devices on loopback (tests/testbed.py, TESTBED.md).

Nothing here is autouse: tests that do not ask for these fixtures are not affected."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def testbed():
    from testbed import Testbed, check_requirements

    check_requirements()  # skip, or fail under CI, before creating anything
    # under /tmp with mode 755 (pytest's tmp dirs are 700): device users must traverse it
    root = Path(tempfile.mkdtemp(prefix="edgeops-testbed-", dir="/tmp"))
    os.chmod(root, 0o755)
    bed = None
    try:
        bed = Testbed(root)
        yield bed
    finally:
        try:
            if bed is not None:
                bed.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def device(testbed):
    """One normal device (session scope: do not break it; add your own to cut links)."""
    return testbed.add_device("dev1")


@pytest.fixture(scope="session")
def slow_device(testbed):
    """A device limited to 25 % of one core (cgroup CPU quota, 10 ms period)."""
    return testbed.add_device("slow1", cpu_quota=0.25)
