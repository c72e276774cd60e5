"""The FSDP sharding plan (lavis.runners.strategy.shard_units) on the tiny OpenFlamingo, without processes."""

from __future__ import annotations

import pytest
from test_training_hooks import tiny_model
from torch import nn

from lavis.common.errors import ConfigError
from lavis.models.flamingo.flamingo import decoder_layers
from lavis.runners.strategy import build_strategy, merge_tied, shard_units


def test_units_pair_each_decoder_layer_with_its_cross_attention_block_then_perceiver():
    model = tiny_model()
    layers = decoder_layers(model.lang_encoder)
    units = shard_units(model)
    assert [[type(m).__name__ for m in u] for u in units] == [
        ["LlamaDecoderLayer", "GatedCrossAttentionBlock"],
        ["LlamaDecoderLayer", "GatedCrossAttentionBlock"],
        ["PerceiverResampler"],
    ]
    assert units[0][0] is layers[0] and units[0][1] is model.gated_cross_attn_layers["0"]
    # The tiny vision tower is small and frozen: it stays with the root unless asked for.
    with_vision = shard_units(model, shard_vision=True)
    assert len(with_vision) == 3 + len(model.vision_encoder.transformer.resblocks)
    # The tied embedding / LM head is in no unit: it stays with the root, together.
    tied = model.lang_encoder.get_input_embeddings().weight
    assert tied is model.lang_encoder.get_output_embeddings().weight
    assert all(p is not tied for u in units for m in u for p in m.parameters())


def test_units_sharing_a_parameter_are_merged():
    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    c.weight = a.weight  # tied
    merged = merge_tied([[a], [b], [c]])
    assert len(merged) == 2 and merged[0] == [a, c] and merged[1] == [b]


def test_unknown_strategy_is_a_config_error_of_the_run_schema():
    from lavis.common.schema import config_instance
    from lavis.runners.run_config import RunConfig

    with pytest.raises(ConfigError, match=r"run\.strategy: 'zero3' is not one of 'ddp', 'fsdp'"):
        config_instance(RunConfig, {"task": "captioning", "strategy": "zero3"}, "run")


def test_fsdp_refuses_mixed_stored_dtypes_in_fp32_at_start_up():
    import torch
    from omegaconf import OmegaConf

    from lavis.common.dist import DistInfo
    from lavis.runners.precision import resolve_precision

    run = OmegaConf.create({"strategy": "fsdp", "evaluate": False})
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ConfigError, match="run.amp=bf16"):
        build_strategy(run, resolve_precision("fp32", dist_info.device), dist_info).place(model)
    # With bf16 compute the unit is gathered in bf16: accepted.
    assert build_strategy(run, resolve_precision("bf16", dist_info.device), dist_info).place(model) is model
