"""What the device benchmarks share: a private EDGEOPS_HOME with a signing key and a trust
root, and a test bed of real sshd devices (tests/testbed.py; root needed), removed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@contextlib.contextmanager
def fleet_world(prefix: str):
    """(test bed, work folder, signing key) with $EDGEOPS_HOME inside the work folder."""
    from testbed import Testbed

    work = Path(tempfile.mkdtemp(prefix=f"edgeops-bench-{prefix}-"))
    os.environ["EDGEOPS_HOME"] = str(work / "home")
    root = Path(tempfile.mkdtemp(prefix="edgeops-testbed-", dir="/tmp"))
    os.chmod(root, 0o755)
    bed = Testbed(root)
    try:
        from edgeops.bundle import keys, trust

        keys.generate("release")
        signer = keys.load_signing("release")
        trust.init(trust.default_dir(), [signer], [signer.public_key], 1, 1,
                   datetime.now(timezone.utc) + timedelta(days=30))
        yield bed, work, signer
    finally:
        bed.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
