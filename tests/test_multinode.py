"""The README's multi-node torchrun command, as far as one host allows: 2 "nodes" of 1 process each.

Two torchrun agents (``--nnodes=2 --node_rank=0|1``) meet at a c10d rendezvous on 127.0.0.1 and train the
tiny OpenFlamingo with train.py under run.strategy=fsdp for 2 steps; the sharded checkpoint holds one shard
per rank, so each "node" took part.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import REPO, TINY_MODEL, read_jsonl, shapes_section, subprocess_env, write_config

from lavis.runners import checkpoint as ckpt
from lavis.runners import sharded_checkpoint as sharded

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_host_train_with_fsdp(shapes_root, tmp_path):
    cfg = write_config(
        tmp_path / "cfg.yaml",
        model=TINY_MODEL,
        datasets={"shapes_caption": shapes_section(shapes_root)},
        run={
            "task": "captioning",
            "device": "cpu",
            "max_epoch": 1,
            "max_steps": 2,
            "batch_size_train": 4,
            "log_freq": 1,
            "progress_bar": False,
            "output_dir": str(tmp_path / "out"),
            "run_name": "run",
            "strategy": "fsdp",
        },
    )
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=twonodes",
                str(REPO / "train.py"),
                "--cfg-path",
                str(cfg),
            ],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    for node, (agent, output) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f"node {node}:\n{output[-4000:]}"
    run_dir = tmp_path / "out" / "run"
    assert "(2 process(es), cpu, fp32)" in (run_dir / "log.txt").read_text()
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "train"] == [1, 2]
    [(step, path)] = ckpt.list_step_checkpoints(run_dir)
    assert step == 2 and sharded.is_sharded_checkpoint(path)
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
