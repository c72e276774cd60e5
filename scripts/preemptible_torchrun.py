#!/usr/bin/env python
"""torchrun that survives preemption: SIGTERM to this launcher stops training cleanly and exits 0.

Usage (every argument goes to torchrun):
    python scripts/preemptible_torchrun.py --nproc_per_node=4 train.py --cfg-path CFG \
        --options run.run_name=myrun run.resume_ckpt_path=latest

Why: torchrun that itself receives SIGTERM forwards it to its workers (which save a checkpoint at the
next step boundary and exit 0) but then exits 1 with a SignalException traceback, so a scheduler
records the preempted job as failed. This launcher runs torchrun as a child and, on SIGTERM or SIGINT,
forwards the signal to torchrun's worker processes only: the workers save and exit 0, torchrun sees
every worker succeed and exits 0, and so does this launcher. A second signal is forwarded to torchrun
itself (its own shutdown). The exit code is torchrun's.

SLURM: deliver the signal to the batch shell only (``#SBATCH --signal=B:TERM@120``) and have the
shell forward it to this launcher; see the README section "Resuming and preemption".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def worker_pids(pid: int) -> list[int]:
    """The direct children of process ``pid`` (Linux /proc): torchrun's worker processes."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(children))


def main(argv: list[str]) -> int:
    """Run ``torchrun argv...``; returns its exit code."""
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv])
    received = {"count": 0}

    def forward(signum, frame):
        received["count"] += 1
        if received["count"] > 1:
            launcher.send_signal(signum)
            return
        workers = worker_pids(launcher.pid)
        print(
            f"preemptible_torchrun: {signal.Signals(signum).name}: forwarding to the workers {workers}",
            file=sys.stderr,
            flush=True,
        )
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return launcher.wait()
        except InterruptedError:  # pragma: no cover - wait() retries on EINTR since Python 3.5
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
