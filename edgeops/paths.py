"""Where edgeops keeps its state: $EDGEOPS_HOME, default ~/.edgeops."""

from __future__ import annotations

import os
from pathlib import Path

REPO_TARGETS = Path(__file__).resolve().parents[1] / "targets"


def home() -> Path:
    """The state folder (created on first use by whoever writes to it)."""
    env = os.environ.get("EDGEOPS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".edgeops"
