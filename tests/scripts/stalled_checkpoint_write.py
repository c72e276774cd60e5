"""Write checkpoint A to PATH, then start writing checkpoint B over it and stall half way.

The parent test kills this process with SIGKILL once it prints STALLED, to check that
an interrupted write leaves A loadable. Usage: stalled_checkpoint_write.py PATH
"""

import os
import sys
import time

import torch

from lavis.runners.checkpoint import save_checkpoint

path = sys.argv[1]
save_checkpoint(path, {"step": 1, "model": {"w": torch.zeros(1000)}})

real_fdopen = os.fdopen


class HalfWriter:
    """Stands in for the temporary file: writes half the bytes, flushes them to disk, then hangs."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        data = bytes(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        print("STALLED", flush=True)
        time.sleep(120)


os.fdopen = lambda fd, mode="r", *a, **k: HalfWriter(real_fdopen(fd, mode, *a, **k))
save_checkpoint(path, {"step": 2, "model": {"w": torch.ones(1000)}})
print("finished without being killed", flush=True)
