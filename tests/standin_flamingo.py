"""A tiny stand-in of the Flamingo network (word-level tokenizer, 2-layer LLaMA, toy perceiver and
cross-attention named like OpenFlamingo's) for the adapter tests; CPU, no files, no downloads."""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 32
MEDIA_DIM = 16


def make_tokenizer():
    """A word-level HF fast tokenizer with Flamingo's added tokens (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(45)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_tokens(["<|endofchunk|>", "<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return tokenizer


def make_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, media):
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media).chunk(2, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(weights @ v)


class GatedBlock(nn.Module):
    """Named like OpenFlamingo's GatedCrossAttentionBlock: attn.{norm,to_q,to_kv,to_out}, ff.{0,1,3}, gates."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn = Attention(dim)
        self.attn_gate = nn.Parameter(torch.tensor([0.1]))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ff_gate = nn.Parameter(torch.tensor([0.1]))

    def forward(self, x, media):
        x = x + torch.tanh(self.attn_gate) * self.attn(x, media)
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class Perceiver(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, dim))
        self.layers = nn.ModuleList([Attention(dim)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = latents + layer(latents, x)
        return self.norm(latents)


class StandInFlamingo(nn.Module):
    """Just the attributes the adapter code relies on; the real network lives in lavis/models/flamingo."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.tokenizer = make_tokenizer()
        self.lang_encoder = make_llama(48, seed)
        self.lang_encoder.resize_token_embeddings(len(self.tokenizer))
        torch.manual_seed(seed + 1)
        self.vision_encoder = nn.Linear(8, MEDIA_DIM)
        self.perceiver = Perceiver(MEDIA_DIM)
        self.gated_cross_attn_layers = nn.ModuleDict({"0": GatedBlock(MEDIA_DIM), "1": GatedBlock(MEDIA_DIM)})

    def forward(self, vision_x, lang_x, labels):
        media = self.perceiver(self.vision_encoder(vision_x))
        x = media
        for block in self.gated_cross_attn_layers.values():
            x = block(x, media)
        out = self.lang_encoder(input_ids=lang_x, labels=labels)
        return out.loss + x.pow(2).mean()


def new_ids(model):
    return [model.tokenizer.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>")]


def make_batch(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lang_x = torch.randint(3, 48, (2, 10), generator=g)
    lang_x[:, 0] = new_ids(model)[1]  # <image> first, as in Flamingo prompts
    lang_x[:, 6] = new_ids(model)[0]
    return torch.randn(2, 3, 8, generator=g), lang_x


def param_groups(model, weight_decay=0.1):
    """The runner's contract policy: no decay for ndim < 2 or names with embed/norm/gate/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(word in name for word in ("embed", "norm", "gate", "bias"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_steps(model, steps=3, lr=1e-2):
    optimizer = torch.optim.AdamW(param_groups(model), lr=lr)
    vision_x, lang_x = make_batch(model)
    for _ in range(steps):
        loss = model(vision_x, lang_x, labels=lang_x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(lm, input_ids):
    with torch.no_grad():
        return lm(input_ids=input_ids).logits
