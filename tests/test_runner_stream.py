"""Training and evaluation on a streamed (IterableDataset) split, like webdataset shards (ShardDataset).

The stream here follows ShardDataset's contract: it orders itself by ``set_epoch`` (the runner
must call it, and must not give it a sampler) and ``len()`` is what one rank yields per epoch.
"""

import pytest
import torch
from torch.utils.data import IterableDataset
from toy_components import ToyModel, ToyRegressionDataset, build_runner, make_cfg, trainable_params

from lavis.common.logging import read_metrics
from lavis.datasets.samples import SplitDataset
from lavis.runners.progress import without_timing


class ToyStream(SplitDataset, IterableDataset):
    """The samples of a ToyRegressionDataset, in an order shuffled by the epoch set with ``set_epoch``."""

    sample_id_key = "sample_id"

    def __init__(self, base: ToyRegressionDataset, shuffle: bool = True):
        self.base, self.shuffle = base, shuffle
        self.epoch = 0
        self.epochs_set: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def sample_ids(self) -> list[int]:
        return self.base.sample_ids()

    def __iter__(self):
        order = torch.arange(len(self.base))
        if self.shuffle:
            order = torch.randperm(len(self.base), generator=torch.Generator().manual_seed(100 + self.epoch))
        for i in order.tolist():
            yield self.base[i]


def stream_datasets() -> dict:
    return {
        "toy": {
            "train": ToyStream(ToyRegressionDataset(32)),
            "val": ToyStream(ToyRegressionDataset(13, 1, 1000), shuffle=False),
        }
    }


RUN = dict(max_epoch=2, valid_splits=["val"], save_freq_steps=3, keep_last=2)


def test_streamed_split_trains_with_set_epoch_and_evaluates_every_sample(tmp_path):
    datasets = stream_datasets()
    runner = build_runner(make_cfg(tmp_path, **RUN), model=ToyModel(dropout=0.0), datasets=datasets)
    summary = runner.train()
    assert summary["status"] == "finished" and runner.global_step == 16  # 2 epochs of 32 / 4
    assert datasets["toy"]["train"].epochs_set == [0, 1]
    evals = [r for r in read_metrics(runner.paths.metrics) if r["split"] == "val"]
    assert [(r["step"], r["n"]) for r in evals] == [(8, 13), (16, 13)]
    assert evals[-1]["mse"] < evals[0]["mse"] * 1.5  # scored real predictions (finite, same scale)
    assert not torch.equal(ToyModel(dropout=0.0).head.weight, runner.model.head.weight)


def test_streamed_split_resumes_mid_epoch_exactly(tmp_path):
    reference = build_runner(make_cfg(tmp_path / "ref", **RUN), model=ToyModel(), datasets=stream_datasets())
    reference.train()
    cut = build_runner(make_cfg(tmp_path / "cut", max_steps=5, **RUN), model=ToyModel(), datasets=stream_datasets())
    assert cut.train()["status"] == "max_steps"
    resumed = build_runner(
        make_cfg(tmp_path / "cut", resume_ckpt_path="latest", **RUN), model=ToyModel(), datasets=stream_datasets()
    )
    assert resumed.train()["status"] == "finished"
    a, b = trainable_params(reference.model), trainable_params(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [without_timing(r) for r in read_metrics(reference.paths.metrics)] == [
        without_timing(r) for r in read_metrics(resumed.paths.metrics)
    ]


def test_uneven_exact_streams_are_refused_for_training_under_ddp():
    from lavis.common.errors import ConfigError
    from lavis.runners.data import TrainStream

    stream = ToyStream(ToyRegressionDataset(32))
    stream.uneven = "exact"
    with pytest.raises(ConfigError, match=r"webdataset.uneven: .*needs 'pad'.*'exact'"):
        TrainStream(stream, lambda items: items, batch_size=4, accum=1, rank=0, world_size=2, seed=0)
    # One process has nothing to balance: the same stream trains.
    assert TrainStream(stream, lambda items: items, 4, 1, 0, 1, 0).steps_per_epoch == 8
