"""The device layout and the A/B slots. Standard library only (the agent package's rule).

    ROOT/                       the agent's folder on the device (chosen at enrolment)
      device.json               name, target, labels (written at enrolment)
      state.json                state.py
      lock                      one install/rollback at a time (flock)
      trust/                    trusted root(s) (verifier.save_trust)
      incoming/                 uploads in progress (*.part, resumable) and received bundles
      models/NAME/a, b          two slots per model name
      models/NAME/current       symlink to a or b, swapped by rename (atomic)
      agent/                    the agent code: versions/V/ and a `current` link (enrolment)

The app finds the active model of NAME at one stable path, `models/NAME/current/model.onnx`
(a link inside each slot to the bundle's model file), and the verified manifest beside it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .state import fsync_dir

SLOTS = ("a", "b")
MODEL_LINK = "model.onnx"
MANIFEST = "manifest.json"


class Layout:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- folders
    @property
    def trust(self) -> Path:
        return self.root / "trust"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def device_file(self) -> Path:
        return self.root / "device.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "lock"

    def model_dir(self, name: str) -> Path:
        return self.models / name

    def slot(self, name: str, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"slot {slot!r} is not one of {SLOTS}")
        return self.model_dir(name) / slot

    def current_link(self, name: str) -> Path:
        return self.model_dir(name) / "current"

    def stable_model_path(self, name: str) -> Path:
        """Where the app loads NAME's active model from, whatever slot is current."""
        return self.current_link(name) / MODEL_LINK

    def create(self) -> None:
        for d in (self.root, self.trust, self.incoming, self.models):
            d.mkdir(parents=True, exist_ok=True)

    # ---- slots
    def current_slot(self, name: str) -> str | None:
        """The slot `current` points to, read from the link itself (the truth on disk)."""
        try:
            target = os.readlink(self.current_link(name))
        except (FileNotFoundError, OSError):
            return None
        return target if target in SLOTS else None

    @staticmethod
    def other(slot: str | None) -> str:
        return "b" if slot == "a" else "a"

    def clear_slot(self, name: str, slot: str) -> None:
        """Empty the idle slot before staging (never the one `current` points to)."""
        if self.current_slot(name) == slot:
            raise RuntimeError(f"refusing to clear slot {slot} of {name}: it is current")
        for p in (self.slot(name, slot), self.slot(name, slot).with_name(slot + ".partial")):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.exists():
                shutil.rmtree(p)

    def switch(self, name: str, slot: str) -> None:
        """Point `current` at SLOT: a new link renamed over the old one, so a reader sees the old
        slot or the new one, never no model; the folder is fsynced so the switch survives power loss."""
        d = self.model_dir(name)
        tmp = d / ".current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(slot, tmp)
        os.replace(tmp, self.current_link(name))
        fsync_dir(d)

    def remove_current(self, name: str) -> None:
        link = self.current_link(name)
        if link.is_symlink():
            link.unlink()
            fsync_dir(link.parent)

    def finish_stage(self, name: str, slot: str, model_rel: str, manifest_bytes: bytes) -> None:
        """After extraction: the stable model link and the verified manifest inside the slot."""
        s = self.slot(name, slot)
        link = s / MODEL_LINK
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(model_rel, link)
        (s / MANIFEST).write_bytes(manifest_bytes)
        fsync_dir(s)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def names(self) -> list[str]:
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if p.is_dir())
