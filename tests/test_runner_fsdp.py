"""run.strategy=fsdp on the real tiny OpenFlamingo, 2 processes on gloo (tests/scripts/fsdp_tiny_run.py).

One torchrun job trains ddp and fsdp runs (LoRA, full fine-tuning of the LM, AdaLoRA) of 10 steps each, checks
activation checkpointing's gradients under fsdp and ends SIGKILLed in a fifth run; a second job resumes
that run from its sharded checkpoint; one process then resumes a copy of it (2 -> 1 re-sharding).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env

from lavis.runners import checkpoint as ckpt
from lavis.runners import sharded_checkpoint as sharded

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_tiny_run.py"

pytestmark = pytest.mark.slow


def launch(out_dir: Path, plan: str, nproc: int = 2):
    import subprocess

    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, str(SCRIPT), str(out_dir), plan],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    killed = launch(out, "compare")
    # The job ends with the SIGKILLed run: torchrun reports the failure of its ranks.
    assert killed.returncode != 0 and (out / "rank0.json").is_file(), killed.stdout[-3000:] + killed.stderr[-3000:]
    steps = [s for s, _ in ckpt.list_step_checkpoints(out / "resumed")]
    assert steps == [4], f"the killed run should have left only its step-4 checkpoint, found {steps}"
    # A copy of the killed run for the 2 -> 1 resume, before the 2-process resume adds later checkpoints.
    shutil.copytree(out / "resumed", out / "resharded")
    resumed = launch(out, "resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    single = launch(out, "reshard", nproc=1)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    (out / "reshard.log").write_text(single.stdout + single.stderr)
    return out


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("trainable", ["lora", "full", "adalora"])
def test_fsdp_trains_the_same_weights_as_ddp(runs, trainable):
    ddp, fsdp = load(runs / f"ddp_{trainable}.pt"), load(runs / f"fsdp_{trainable}.pt")
    assert sorted(ddp) == sorted(fsdp)
    if trainable == "full":  # every LM weight trains (tied embedding / head once)
        assert "lang_encoder.model.layers.0.self_attn.q_proj.base_layer.weight" in fsdp
        assert "lang_encoder.model.embed_tokens.weight" in fsdp
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=2e-6, msg=name)
    for rank in (0, 1):
        results = json.loads((runs / f"rank{rank}.json").read_text())
        for strategy in ("ddp", "fsdp"):
            run = results[f"{strategy}_{trainable}"]
            assert run["summary"]["status"] == "finished" and run["summary"]["step"] == 10
            # Frozen weights: bitwise as built, and no gradient was ever stored for them.
            assert run["frozen"] > 0 and run["changed"] == [] and run["with_grad"] == [], (strategy, rank)
    if trainable == "adalora":
        # AdaLoRA's rank re-allocation ran under fsdp (its tensors are replicated) and chose what ddp chose.
        patterns = [
            json.loads((runs / f"rank{r}.json").read_text())[f"{s}_adalora"]["rank_pattern"]
            for r in (0, 1)
            for s in ("ddp", "fsdp")
        ]
        assert patterns[0] and patterns[0][0] and all(p == patterns[0] for p in patterns)
    metrics = [json.loads(line) for line in (runs / f"fsdp_{trainable}" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["split"] == "train"]
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.2
    # Validation (generation) ran under fsdp on both ranks and covered the 5 samples once.
    assert [m["n"] for m in metrics if m["split"] == "val"] == [5]


def test_fsdp_step_checkpoints_are_sharded_directories_and_best_is_one_file(runs):
    run_dir = runs / "fsdp_lora"
    found = ckpt.list_step_checkpoints(run_dir)
    assert [s for s, _ in found] == [4, 8, 10] and all(sharded.is_sharded_checkpoint(p) for _, p in found)
    assert {p.name for p in found[-1][1].iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"}
    # best.pt: a single file of the full trainable weights, as under ddp.
    best = ckpt.load_checkpoint(run_dir / "checkpoints" / ckpt.BEST_NAME)
    final = load(runs / "fsdp_lora.pt")
    assert sorted(best["model"]) == sorted(final)
    # The sharded checkpoint holds only what trains (no frozen tied LM head), and its export equals it.
    weights = sharded.load_full_tensors(found[-1][1])
    assert sorted(weights) == sorted(final)
    out = sharded.consolidate(found[-1][1], runs / "consolidated.pt")
    single = ckpt.load_checkpoint(out)
    assert single["step"] == 10 and single["kind"] == "weights" and "optimizer" not in single
    for name, value in final.items():
        assert torch.equal(single["model"][name], value), name
        assert torch.equal(weights[name], value), name


def test_sigkill_then_resume_from_a_sharded_checkpoint_is_bitwise_the_uninterrupted_run(runs):
    uninterrupted, resumed = load(runs / "fsdp_lora.pt"), load(runs / "resume.pt")
    assert sorted(uninterrupted) == sorted(resumed)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    results = json.loads((runs / "resume_rank0.json").read_text())["resumed"]
    assert results["summary"]["step"] == 10 and results["changed"] == []


def test_resume_on_one_process_reshards_weights_and_optimizer_state(runs):
    step4 = runs / "resharded" / "checkpoints" / "step_00000004"
    loaded = load(runs / "reshard_loaded.pt")
    weights, optim = sharded.load_full_tensors(step4), sharded.load_full_tensors(step4, "optimizer.state.")
    assert sorted(loaded["model"]) == sorted(weights) and sorted(loaded["optimizer"]) == sorted(optim)
    assert any(name.endswith(".exp_avg_sq") for name in optim)
    for name in weights:
        assert torch.equal(loaded["model"][name], weights[name]), name
    for name in optim:
        assert torch.equal(loaded["optimizer"][name], optim[name]), name
    log = (runs / "reshard.log").read_text()
    assert "written by 2 process(es), resuming with 1" in log and "re-sharded" in log
    summary = json.loads((runs / "resharded.json").read_text())
    assert summary["summary"]["status"] == "max_steps" and summary["summary"]["step"] == 6
    assert summary["changed"] == []


def test_activation_checkpointing_gives_equal_gradients_under_fsdp(runs):
    grads = load(runs / "ac_grads.pt")
    plain, checkpointed = grads[False], grads[True]
    assert sorted(plain) == sorted(checkpointed) and len(plain) > 50
    assert any(n.startswith("perceiver.") for n in plain) and any("gated_cross_attn" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_export_format_single_of_a_sharded_checkpoint_equals_the_gathered_weights(runs, tmp_path):
    from lavis.export import export

    [*_, (step, directory)] = ckpt.list_step_checkpoints(runs / "fsdp_lora")
    out = export(str(directory), str(tmp_path / "single"), "single")
    single = ckpt.load_checkpoint(out)
    final = load(runs / "fsdp_lora.pt")  # gathered from the shards at the end of training (step 10)
    assert step == 10 and sorted(single["model"]) == sorted(final)
    for name, value in final.items():
        assert torch.equal(single["model"][name], value), name
    # The single file loads like any step checkpoint (weights) and says which run it came from.
    weights, state = sharded.read_weights(out)
    assert sorted(weights) == sorted(final) and state["config"]["run"]["strategy"] == "fsdp"
