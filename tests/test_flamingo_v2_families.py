"""The v2 LM families: the MosaicGPT port, family detection and refusals, the v2 model types' parameter
counts on the meta device, fp16 safety of MPT's ALiBi attention, and tiny MPT / GPT-NeoX models that
fine-tune with LoRA and evaluate few-shot. (The shipped v2 configs: test_flamingo_v2_configs.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_DECODING, read_jsonl, shapes_section, write_config
from omegaconf import OmegaConf
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM

from lavis.cli import evaluate_main, train_main
from lavis.common.config import read_yaml
from lavis.common.errors import ConfigError
from lavis.models import build_model
from lavis.models.flamingo.flamingo import Flamingo
from lavis.models.flamingo.language_models import FAMILIES, family_of_directory, family_of_model
from lavis.models.flamingo.language_models.mosaic_gpt import MosaicGPTConfig, MosaicGPTForCausalLM
from lavis.models.flamingo.vision import build_vision_tower

torch.set_num_threads(1)
MODEL_TYPES = Path("lavis/configs/models/openflamingo")
MOSAIC = {
    "model_type": "mosaic_gpt",
    "d_model": 32,
    "n_heads": 4,
    "n_layers": 2,
    "mlp_ratio": 4,
    "max_seq_len": 64,
    "vocab_size": 90,
    "attn_qk_ln": True,
    "alibi": True,
    "alibi_bias_max": 8,
    "no_bias": True,
    "attn_clip_qkv": None,
    "softmax_scale": None,
    "logit_scale": None,
    "embedding_fraction": 1.0,
    "low_precision_layernorm": True,
    "architectures": ["MosaicGPT"],
    "auto_map": {"AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"},
}


# ---------------------------------------------------------------- MosaicGPT port
def mosaic_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under MosaicGPT's own names (ln_1, attn.{Wqkv,q_ln,k_ln,out_proj}, ln_2, mlp.*)."""
    g = torch.Generator().manual_seed(seed)
    d, r = cfg["d_model"], cfg["mlp_ratio"]
    randn = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s  # noqa: E731
    state = {
        "transformer.wte.weight": randn(cfg["vocab_size"], d, s=0.5),
        "transformer.norm_f.weight": 1 + randn(d, s=0.1),
    }
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        state.update(
            {
                p + "ln_1.weight": 1 + randn(d, s=0.1),
                p + "ln_2.weight": 1 + randn(d, s=0.1),
                p + "attn.Wqkv.weight": randn(3 * d, d, s=2 / math.sqrt(d)),
                p + "attn.q_ln.weight": 1 + randn(d, s=0.1),
                p + "attn.k_ln.weight": 1 + randn(d, s=0.1),
                p + "attn.out_proj.weight": randn(d, d, s=1 / math.sqrt(d)),
                p + "mlp.mlp_up.weight": randn(r * d, d, s=1 / math.sqrt(d)),
                p + "mlp.mlp_down.weight": randn(d, r * d, s=1 / math.sqrt(r * d)),
            }
        )
    return state


def mosaic_reference_logits(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """MosaicGPT's forward written out independently: QK-LayerNorm, ALiBi slope * (key - query), tied head."""
    d, h, n = cfg["d_model"], cfg["n_heads"], ids.shape[1]
    ln = lambda x, w: F.layer_norm(x, (d,), w, None, 1e-5)  # noqa: E731  (no_bias: LayerNorms without bias)
    slopes = 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)
    distance = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    bias = (slopes[:, None, None] * distance).masked_fill(distance > 0, -math.inf)
    heads = lambda t: t.view(ids.shape[0], n, h, d // h).transpose(1, 2)  # noqa: E731
    x = state["transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        q, k, v = (ln(x, state[p + "ln_1.weight"]) @ state[p + "attn.Wqkv.weight"].T).chunk(3, dim=-1)
        q, k = ln(q, state[p + "attn.q_ln.weight"]), ln(k, state[p + "attn.k_ln.weight"])
        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // h) + bias
        attn = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(ids.shape[0], n, d)
        x = x + attn @ state[p + "attn.out_proj.weight"].T
        m = ln(x, state[p + "ln_2.weight"])
        x = x + F.gelu(m @ state[p + "mlp.mlp_up.weight"].T) @ state[p + "mlp.mlp_down.weight"].T
    return ln(x, state["transformer.norm_f.weight"]) @ state["transformer.wte.weight"].T


def write_mosaic_dir(path: Path, cfg: dict = MOSAIC, state: dict | None = None) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    state = state if state is not None else mosaic_weights(cfg)
    torch.save(state, path / "pytorch_model.bin")
    return state


def test_mosaic_gpt_port_matches_an_independent_forward(tmp_path):
    state = write_mosaic_dir(tmp_path / "mpt1b")
    family = family_of_directory(str(tmp_path / "mpt1b"))
    lm = family.load(str(tmp_path / "mpt1b"), torch.float32, None)
    assert family.name == "mosaic_gpt" and family_of_model(lm) is family and family.is_tied(lm)
    ids = torch.randint(0, MOSAIC["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
    expected = mosaic_reference_logits(state, MOSAIC, ids)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # QK-LayerNorm matters: the same weights in native MPT (no q_ln / k_ln) are far off.
    native = MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=90))
    native.load_state_dict({k: v for k, v in lm.state_dict().items() if "_ln." not in k}, strict=False)
    with torch.no_grad():
        assert (native(input_ids=ids).logits - expected).abs().max() > 1e-2
        # The KV cache path gives the full forward's last logits.
        out = lm(input_ids=ids[:, :-1], use_cache=True)
        step = lm(input_ids=ids[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, ours[:, -1], atol=1e-5, rtol=1e-5)


def test_mosaic_gpt_weights_that_do_not_fit_are_named(tmp_path):
    state = mosaic_weights(MOSAIC)
    state["transformer.blocks.1.mlp.mlp_gate.weight"] = state.pop("transformer.blocks.1.mlp.mlp_up.weight")
    write_mosaic_dir(tmp_path / "bad", state=state)
    with pytest.raises(Exception, match=r"missing \['transformer\.blocks\.1\.ffn\.up_proj\.weight'\].*mlp_gate"):
        FAMILIES["mosaic_gpt"].load(str(tmp_path / "bad"), torch.float32, None)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"attn_qk_ln": False}, "without attn_qk_ln"),
        ({"alibi": False}, r"alibi: false"),
        ({"mlp_ratio": 8}, "MLP ratio 8"),
    ],
)
def test_mosaic_gpt_settings_the_port_lacks_are_refused(tmp_path, change, message):
    write_mosaic_dir(tmp_path / "x", {**MOSAIC, **change})
    with pytest.raises(ConfigError, match=message):
        FAMILIES["mosaic_gpt"].load(str(tmp_path / "x"), torch.float32, None)


def test_unknown_family_is_refused_naming_the_expected_ones(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(
        json.dumps({"model_type": "falcon_remote", "auto_map": {"AutoModelForCausalLM": "x.Y"}})
    )
    with pytest.raises(
        ConfigError,
        match=r"falcon_remote.*remote code is never run.*mpt = MPT \(MPT-7B.*"
        r"gpt_neox = GPT-NeoX.*mosaic_gpt = MosaicGPT",
    ):
        family_of_directory(str(tmp_path / "lm"))
    # A remote-code MPT directory (auto_map, llm-foundry's class name) loads into the native class.
    MptForCausalLM(MptConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=16, vocab_size=20)).save_pretrained(
        tmp_path / "lm"
    )
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    config.update(architectures=["MPTForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"})
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    lm = family_of_directory(str(tmp_path / "lm")).load(str(tmp_path / "lm"), torch.float32, None)
    assert type(lm) is MptForCausalLM
    config["attn_config"]["qk_ln"] = True
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"attn_config\.qk_ln: true"):
        family_of_directory(str(tmp_path / "lm")).load(str(tmp_path / "lm"), torch.float32, None)


# ---------------------------------------------------------------- release parameter counts
V2_VOCAB = 50280  # GPT-NeoX-20B's 50277 tokens + <|endofchunk|>, <image>, <PAD> (the 50432-row LMs shrink)
RELEASE_LMS = {
    "mpt1b": lambda: MosaicGPTForCausalLM(
        MosaicGPTConfig(d_model=2048, n_heads=16, n_layers=24, max_seq_len=2048, vocab_size=V2_VOCAB)
    ),
    "rpj3b": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=2560,
            num_attention_heads=32,
            num_hidden_layers=32,
            intermediate_size=10240,
            vocab_size=V2_VOCAB,
            max_position_embeddings=2048,
            rotary_pct=1.0,
            use_parallel_residual=False,
            tie_word_embeddings=False,
        )
    ),
    "mpt7b": lambda: MptForCausalLM(
        MptConfig(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048, vocab_size=V2_VOCAB)
    ),
}
# model type: (LM, environment variable, total parameters, checkpoint.pt parameters, cross-attention layers).
# The checkpoint figures times 4 bytes are the release files' sizes: 4.19 GB (3B), 4.87 GB (4B-langinstruct;
# the base 4B file also holds bool buffers), 5.54 GB (9B).
RELEASES = {
    "mpt1b_vitl14": ("mpt1b", "MPT1B_PATH", 2_559_117_360, 1_046_992_944, 24),
    "mpt1b_dolly_vitl14": ("mpt1b", "MPT1B_DOLLY_PATH", 2_559_117_360, 1_046_992_944, 24),
    "rpj3b_vitl14": ("rpj3b", "RPJ3B_PATH", 4_039_816_224, 1_218_197_536, 16),
    "rpj3b_instruct_vitl14": ("rpj3b", "RPJ3B_INSTRUCT_PATH", 4_039_816_224, 1_218_197_536, 16),
    "mpt7b_vitl14": ("mpt7b", "MPT7B_PATH", 8_131_465_232, 1_384_781_840, 8),
}


@pytest.mark.parametrize("model_type", sorted(RELEASES))
def test_v2_model_type_parameter_count_on_meta_device(model_type):
    lm_name, env, total, checkpoint, n_xattn = RELEASES[model_type]
    cfg = read_yaml(MODEL_TYPES / f"{model_type}.yaml").model
    assert cfg.model_type == model_type and cfg.xattn_semantics == "v2" and cfg.lang_encoder_env == env
    assert cfg.adapters.target_modules is None  # the family chooses the LoRA targets
    with torch.device("meta"):
        vision = build_vision_tower(cfg.clip_vision_encoder_path, None)
        lm = RELEASE_LMS[lm_name]()
        model = Flamingo(
            vision.visual,
            lm,
            vis_dim=vision.vis_dim,
            media_token_id=50278,
            eoc_token_id=50277,
            pad_token_id=50279,
            cross_attn_every_n_layers=cfg.cross_attn_every_n_layers,
            perceiver=dict(cfg.perceiver),
            cross_attention=dict(cfg.cross_attention),
        )
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model) == total
    family = family_of_model(lm)
    carried = count(model.perceiver) + count(model.gated_cross_attn_layers)
    carried += sum(lm.get_parameter(n).numel() for n in family.checkpoint_required(lm))
    assert carried == checkpoint and len(model.gated_cross_attn_layers) == n_xattn


# ---------------------------------------------------------------- fp16 safety of MPT's ALiBi attention
def test_mpt_alibi_attention_is_fp16_safe_at_full_length():
    # ALiBi's bias reaches -slope * (max_seq_len - 1); it is a float32 tensor, so adding it promotes the
    # scores to float32 before the mask and the (float32) softmax: nothing overflows or loses the far keys.
    torch.manual_seed(0)
    lm = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 256))
    with torch.no_grad():
        full = lm(input_ids=ids).logits
        half = lm.half()(input_ids=ids).logits.float()
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < 5e-2 * full.abs().max()


# ---------------------------------------------------------------- tiny MPT / GPT-NeoX: LoRA training, few-shot
@pytest.mark.parametrize("family,target", [("mpt", "Wqkv"), ("gpt_neox", "query_key_value")])
def test_tiny_family_trains_with_lora_and_evaluates_fewshot(family, target, tmp_path, shapes_root):
    model = {
        "arch": "openflamingo",
        "model_type": f"tiny_{family}",
        "trainable": {
            "perceiver": True,
            "gated_cross_attn": True,
            "new_token_embeddings": False,
            "lm_embeddings": True,
        },
        "adapters": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "apply_to": ["lang_encoder"]},
    }
    built = build_model(OmegaConf.merge(read_yaml(MODEL_TYPES / f"tiny_{family}.yaml").model, model))
    assert family_of_model(built.lang_encoder).name == family
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in built.named_parameters() if ".lora_A." in n}
    assert lora == set(FAMILIES[family].lora_target_modules) and target in lora
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "train.yaml",
        model=model,
        datasets={"shapes_caption": shapes_section(shapes_root)},
        run={
            "task": "captioning",
            "device": "cpu",
            "max_steps": 4,
            "batch_size_train": 8,
            "init_lr": 2e-3,
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "log_freq": 1,
            "progress_bar": False,
            "valid_splits": [],
            "output_dir": str(out),
            "run_name": "t",
        },
    )
    train_main(["--cfg-path", str(cfg)])
    losses = [r["loss"] for r in read_jsonl(out / "t" / "metrics.jsonl") if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    checkpoint = sorted((out / "t" / "checkpoints").glob("step_*.pt"))[-1]
    eval_cfg = write_config(
        tmp_path / "eval.yaml",
        model=model,
        datasets={"shapes_caption": shapes_section(shapes_root)},
        run={
            "task": "captioning",
            "device": "cpu",
            "test_splits": ["val"],
            "demo_split": "train",
            "num_shots": [0, 2],
            "num_trials": 1,
            "trial_seeds": [3],
            "num_samples": 3,
            "batch_size_eval": 3,
            "metrics": ["CIDEr"],
            "output_dir": str(out),
            "run_name": "e",
            **FAST_DECODING,
        },
    )
    evaluate_main(["--cfg-path", str(eval_cfg), "--checkpoint", str(checkpoint)])
    table = json.loads((out / "e" / "fewshot_table.json").read_text())
    (row,) = table["rows"].values()
    assert sorted(map(int, row)) == [0, 2] and all(math.isfinite(c["mean"]) for c in row.values())
