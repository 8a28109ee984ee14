"""Permissions of the files the engine writes.

Atomic writers create a temporary file and rename it into place. ``tempfile.mkstemp``
and safetensors' ``save_file`` create files readable by their owner only (0600), so a
checkpoint or a cache shard would not be readable by a group that can read everything
else in the run folder (``metrics.jsonl`` is 0644). :func:`set_default_mode` gives a
written file the permissions ``open(path, "w")`` would have: 0666 minus the umask.
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def umask() -> int:
    """The process umask (read from /proc on Linux, else set and restored under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike) -> None:
    """Gives ``path`` mode ``0666 & ~umask`` (0644 under the usual umask 022), as a new file opened for writing gets."""
    os.chmod(path, 0o666 & ~umask())
