"""run.group_by_length: training steps of samples of similar size, the same samples for any split of a step.

The sampler's claims are checked on index streams (which samples each rank sees, and when); the sizes
it groups by are checked against the real in-context items of the shapes set, whose collated batches
are what the padding saving is about.
"""

import numpy as np
import pytest
from conftest import TINY_MODEL, write_config
from torch.utils.data import IterableDataset

from lavis.cli import build_components
from lavis.common.config import load_config
from lavis.common.errors import ConfigError
from lavis.datasets.fewshot import InContextTrainingDataset
from lavis.datasets.samples import SplitDataset
from lavis.runners.data import LengthGroupedSampler, TrainStream


class SizedIndices(SplitDataset):
    """Item i is i; its image count is sizes[i]."""

    sample_id_key = "i"

    def __init__(self, sizes):
        self.sizes = list(sizes)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, index):
        return index

    def sample_ids(self):
        return list(range(len(self)))

    def image_counts(self):
        return list(self.sizes)


SIZES = np.random.default_rng(0).integers(1, 6, size=1003).tolist()  # 1 image + 0..4 demonstrations


def rank_orders(step_batch, world_size, epoch=0, sizes=SIZES):
    samplers = [LengthGroupedSampler(sizes, step_batch, r, world_size, seed=7) for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def step_sets(batch_size, world_size, accum):
    """The set of samples of each optimizer step of an epoch, as the ranks' TrainStreams make it up."""
    streams = [
        TrainStream(SizedIndices(SIZES), list, batch_size, accum, r, world_size, seed=7, group_by_length=True)
        for r in range(world_size)
    ]
    return [
        sorted(i for stream in streams for micro_batch in stream.next_step() for i in micro_batch)
        for _ in range(streams[0].steps_per_epoch)
    ]


def test_every_split_of_a_step_trains_the_same_samples():
    one = step_sets(32, 1, 1)
    assert len(one) == len(SIZES) // 32
    for batch_size, world_size, accum in [(16, 2, 1), (8, 4, 1), (8, 1, 4), (4, 2, 4)]:
        assert step_sets(batch_size, world_size, accum) == one, (batch_size, world_size, accum)
    # Other global batches group otherwise.
    assert step_sets(16, 1, 1)[: len(one)] != one


def test_each_sample_at_most_once_per_epoch_and_epochs_differ():
    orders = rank_orders(32, 2)
    seen = [i for order in orders for i in order]
    assert len(seen) == len(set(seen)) == len(SIZES) - len(SIZES) % 32
    assert all(len(order) == len(LengthGroupedSampler(SIZES, 32, 0, 2, 7)) for order in orders)
    assert rank_orders(32, 2) == orders  # a pure function of (seed, epoch)
    assert rank_orders(32, 2, epoch=1) != orders


def padded_share(micro_batches, sizes):
    """Fraction of the images a batch padded to its largest row computes that are padding."""
    padded = sum(len(mb) * max(sizes[i] for i in mb) for mb in micro_batches)
    return 1 - sum(sizes[i] for mb in micro_batches for i in mb) / padded


def test_grouped_steps_pad_far_less_than_random_ones():
    (order,) = rank_orders(16, 1)
    grouped = [order[i : i + 16] for i in range(0, len(order), 16)]
    shuffled = np.random.default_rng(1).permutation(len(SIZES))[: len(order)].tolist()
    random_batches = [shuffled[i : i + 16] for i in range(0, len(shuffled), 16)]
    print(f"padding: grouped {padded_share(grouped, SIZES):.3f}, random {padded_share(random_batches, SIZES):.3f}")
    assert padded_share(random_batches, SIZES) > 0.3
    assert padded_share(grouped, SIZES) < 0.05
    # Steps are not sorted over the epoch: large and small ones alternate.
    firsts = [SIZES[mb[0]] for mb in grouped[:20]]
    assert firsts != sorted(firsts)


def test_stream_resumes_mid_epoch_with_the_same_micro_batches():
    dataset = SizedIndices(SIZES)

    def stream():
        return TrainStream(dataset, list, 8, 2, rank=1, world_size=2, seed=3, group_by_length=True)

    whole = stream()
    micro_batches = [mb for _ in range(2 * whole.steps_per_epoch) for mb in whole.next_step()]
    resumed = stream()
    resumed.seek(0, 10)
    rest = [mb for _ in range(2 * whole.steps_per_epoch - 5) for mb in resumed.next_step()]
    assert rest == micro_batches[10:]


def test_a_streamed_split_cannot_be_grouped():
    class Stream(SizedIndices, IterableDataset):
        def __iter__(self):
            return iter(range(len(self)))

    with pytest.raises(ConfigError, match="run.group_by_length"):
        TrainStream(Stream(SIZES), list, 4, 1, 0, 1, 0, group_by_length=True)


def test_in_context_image_counts_are_those_of_the_items(shapes_root, tmp_path):
    datasets = {"shapes_vqa": {"shapes": {"root": str(shapes_root), "num_images": 50}}}
    cfg_path = write_config(tmp_path / "group.yaml", model=TINY_MODEL, datasets=datasets, run={"task": "vqa"})
    task, model, built = build_components(load_config(cfg_path))
    train = InContextTrainingDataset(built["shapes_vqa"]["train"], max_shots=4, seed=5)
    counts = train.image_counts()
    assert len(counts) == len(train) and set(counts) == {1, 2, 3, 4, 5}
    collate = task.collator(model, "train")
    for i in range(0, len(train), max(1, len(train) // 12)):
        item = train[i]
        assert counts[i] == len(item["demos"]) + 1
        assert collate([item])["vision_x"].shape[1] == counts[i]
