"""Tokenizers: Flamingo special tokens, legacy LLaMA tokenisation, and the tiny in-process tokenizer.

OpenFlamingo-9B was trained with transformers 4.28's *legacy* LLaMA tokenizer, where every text
segment that follows a special token gets the sentencepiece dummy prefix ("▁"): ``<image>A`` is
``<image> ▁A``. transformers 5's ``AutoTokenizer`` rebuilds LLaMA tokenizers in the non-legacy way,
so we load ``tokenizer.json`` with the ``tokenizers`` library as is (its ``Prepend("▁")`` normalizer
runs per segment between added tokens, which is exactly the legacy behaviour).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from lavis.common.errors import ConfigError
from lavis.common.special_tokens import END_OF_CHUNK, MEDIA_TOKEN, PAD_TOKEN

TINY_CORPUS = Path(__file__).with_name("tiny_corpus.txt")


def add_flamingo_tokens(tokenizer) -> None:
    """Add ``<|endofchunk|>`` then ``<image>`` (in that order, as the release) and ``<PAD>`` if no pad."""
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def _special(config: dict, name: str, default: str | None) -> str | None:
    value = config.get(name, default)
    if isinstance(value, dict):
        value = value.get("content", default)
    return value


def load_llama_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A LLaMA tokenizer from a local HF directory, with legacy (transformers 4.28) tokenisation."""
    return load_tokenizer(path)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer of a local HF directory, exactly as its ``tokenizer.json`` says, plus the Flamingo tokens.

    LLaMA (v1): legacy tokenisation, see the module docstring. GPT-NeoX-20B (all v2 LMs): byte-level BPE,
    no BOS, no pad token (so ``<PAD>`` is added: 50277 + 3 tokens). Special tokens the directory does not
    name default to LLaMA's. transformers 5's ``AutoTokenizer`` would instead make ``<|padding|>`` the pad
    token of GPT-NeoX tokenizers (502 instead of 503 tokens, and the v2 checkpoints no longer fit).
    """
    directory = Path(path)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(
            f"model.tokenizer_path: {path!r} has no tokenizer.json (a local Hugging Face tokenizer directory "
            "is needed; set it with --options model.tokenizer_path=DIR or the model type's environment variable)"
        )
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            config = {**json.loads((directory / name).read_text()), **config}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_file(str(tokenizer_file)),
        bos_token=_special(config, "bos_token", "<s>"),
        eos_token=_special(config, "eos_token", "</s>"),
        unk_token=_special(config, "unk_token", "<unk>"),
        pad_token=_special(config, "pad_token", None),
        clean_up_tokenization_spaces=False,
    )
    add_flamingo_tokens(tokenizer)
    return tokenizer


@lru_cache(maxsize=4)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    """Train the tiny BPE once per process (deterministic) and return it serialised."""
    # Train on whitespace-delimited words so that every merge stays inside a word, as in sentencepiece.
    trainer_tok = tokenizers.Tokenizer(BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Punctuation("isolated"),  # "answer:" -> "answer" ":" so words stay whole tokens
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    base = ["<unk>", "<s>", "</s>"]
    trainer = BpeTrainer(
        vocab_size=max(vocab_size - len(byte_tokens), 64),
        special_tokens=base,
        show_progress=False,
        initial_alphabet=list("▁.,?:!'0123456789"),
    )
    trainer_tok.train([str(TINY_CORPUS)], trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # LLaMA layout: <unk> <s> </s>, the 256 byte-fallback tokens, then the learned pieces.
    vocab = {tok: i for i, tok in enumerate(base + byte_tokens)}
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in base])
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """A small LLaMA-style BPE (byte fallback, BOS prepended) trained in-process on ``tiny_corpus.txt``.

    The corpus covers every word of the synthetic shapes data set as a whole token; any other text still
    encodes through the byte-fallback tokens. Flamingo special tokens are added.
    """
    tok = tokenizers.Tokenizer.from_str(_tiny_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )
    add_flamingo_tokens(tokenizer)
    return tokenizer
