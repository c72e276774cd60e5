"""The Python API after training, in the manner of LAVIS: load a model, caption images, answer questions.

    from lavis.models import load_model_and_preprocess
    model, vis_processors, txt_processors = load_model_and_preprocess(
        "openflamingo", model_type="tiny", checkpoint="output/run/checkpoints/best.pt")
    model.caption(["cat.jpg"])                      # ['a cat on a sofa']
    model.answer(["cat.jpg"], ["What is this?"])    # ['cat']
    model.generate_interleaved("<image>Output:a dog<|endofchunk|><image>Output:", ["dog.jpg", "cat.jpg"])

``caption`` and ``answer`` build the prompts the model was trained and evaluated with (the collators of
lavis.datasets, in-context demonstrations first) and clean the text as the evaluation does;
``generate_interleaved`` takes any prompt whose ``<image>`` tags are matched, in order, by the images.
Images are PIL images or paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lavis.common.errors import ConfigError, DataError
from lavis.common.special_tokens import MEDIA_TOKEN

# OpenFlamingo's evaluation decoding (captions: 3 beams, length penalty -2, 20 tokens; VQA: 5 tokens).
CAPTION_DECODING = {"num_beams": 3, "max_new_tokens": 20, "length_penalty": -2.0}
ANSWER_DECODING = {"num_beams": 3, "max_new_tokens": 5, "length_penalty": -2.0}


def _open_image(image, where: str):
    from lavis.datasets.samples import decode_image

    if isinstance(image, (str, Path)):
        return decode_image(str(image), where)
    if hasattr(image, "convert"):  # a PIL image (any Image subclass, third-party)
        return image
    raise DataError(f"{where}: expected a PIL image or an image path, got {type(image).__name__}")


class InferenceMixin:
    """``caption``, ``answer`` and ``generate_interleaved`` for a Flamingo with a tokenizer and image processor."""

    def _pixels(self, image, where: str) -> torch.Tensor:
        return self.image_processor(_open_image(image, where).convert("RGB"))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _generate_batch(self, batch: dict, decoding: dict) -> list[str]:
        from lavis.models.decoding import decode_texts

        device = self._device()
        dtype = next(self.vision_encoder.parameters()).dtype
        new = self.generate(
            batch["vision_x"].to(device=device, dtype=dtype),
            batch["lang_x"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            **decoding,
        )
        return decode_texts(self.tokenizer, new)

    def _items(self, images: Sequence, texts: Sequence[str] | None, demos, kind: str) -> list[dict]:
        demo_items = []
        width = 2 if kind == "caption" else 3
        for i, demo in enumerate(demos or []):
            if not isinstance(demo, (tuple, list)) or len(demo) != width:
                shape = "(image, caption)" if kind == "caption" else "(image, question, answer)"
                raise DataError(f"demos[{i}]: expected a {shape} tuple, got {demo!r:.80}")
            image, *fields = demo
            item = {"image": self._pixels(image, f"demo {i}"), "image_id": -1 - i}
            if kind == "caption":
                (item["text_input"],) = fields
            else:
                item["text_input"], item["answer"] = fields
            demo_items.append(item)
        items = []
        for i, image in enumerate(images):
            item = {"image": self._pixels(image, f"image {i}"), "image_id": i, "question_id": i, "demos": demo_items}
            if texts is not None:
                item["text_input"] = texts[i]
            items.append(item)
        return items

    @torch.no_grad()
    def caption(
        self, images: Sequence, demos: Sequence[tuple] | None = None, batch_size: int = 8, **decoding
    ) -> list[str]:
        """A caption per image; ``demos`` are (image, caption) pairs shown first (in-context examples)."""
        from lavis.datasets.collators import CaptionCollator
        from lavis.metrics.postprocess import postprocess_caption

        # One image (a path, or a PIL image: third-party, has .convert) or a list of them.
        images = [images] if isinstance(images, (str, Path)) or hasattr(images, "convert") else list(images)
        collate = CaptionCollator(self.tokenizer, role="eval")
        settings = {**CAPTION_DECODING, **decoding}
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            batch = collate(self._items(images[start : start + batch_size], None, demos, "caption"))
            out += [postprocess_caption(t) for t in self._generate_batch(batch, settings)]
        return out

    @torch.no_grad()
    def answer(
        self,
        images: Sequence,
        questions: Sequence[str] | str,
        demos: Sequence[tuple] | None = None,
        batch_size: int = 8,
        **decoding,
    ) -> list[str]:
        """A short answer per (image, question); ``demos`` are (image, question, answer) triples shown first."""
        from lavis.datasets.collators import VQACollator
        from lavis.metrics.postprocess import postprocess_answer

        # One image (a path, or a PIL image: third-party, has .convert) or a list of them.
        images = [images] if isinstance(images, (str, Path)) or hasattr(images, "convert") else list(images)
        questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
        if len(questions) != len(images):
            raise DataError(f"answer: {len(images)} image(s) but {len(questions)} question(s)")
        collate = VQACollator(self.tokenizer, role="eval")
        settings = {**ANSWER_DECODING, **decoding}
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            batch = collate(self._items(images[chunk], questions[chunk], demos, "vqa"))
            out += [postprocess_answer(t) for t in self._generate_batch(batch, settings)]
        return out

    @torch.no_grad()
    def generate_interleaved(self, prompt: str, images: Sequence, **decoding) -> str:
        """The text generated after ``prompt``, whose ``<image>`` tags stand for ``images`` in order."""

        images = list(images)
        if prompt.count(MEDIA_TOKEN) != len(images):
            raise DataError(
                f"generate_interleaved: the prompt has {prompt.count(MEDIA_TOKEN)} {MEDIA_TOKEN} tag(s) "
                f"but {len(images)} image(s) were given"
            )
        if not images:
            raise DataError("generate_interleaved: give at least one image (and its <image> tag)")
        pixels = torch.stack([self._pixels(image, f"image {i}") for i, image in enumerate(images)])
        encoded = self.tokenizer([prompt], return_tensors="pt")
        batch = {
            "vision_x": pixels[None, :, None],
            "lang_x": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
        }
        return self._generate_batch(batch, {**CAPTION_DECODING, **decoding})[0]


def model_config(name: str = "openflamingo", model_type: str | None = None, cfg=None) -> dict:
    """The model section of ``name``/``model_type`` (its default YAML), updated with ``cfg``'s model section."""
    from omegaconf import OmegaConf

    from lavis.common.config import model_default_path, read_yaml

    given: dict = {}
    if cfg is not None:
        if isinstance(cfg, (str, Path)):
            cfg = read_yaml(cfg)
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        given = dict(plain.get("model", plain))
    name = given.get("arch", name)
    model_type = given.get("model_type", model_type)
    if not model_type:
        raise ConfigError(
            "load_model_and_preprocess: give model_type (e.g. tiny, llama7b_vitl14), a cfg or a checkpoint"
        )
    path = model_default_path(name, model_type)
    if not path.is_file():
        from lavis.common.registry import registry

        registry.get("model", name, key_path="name")  # an unknown arch: the registry's error lists the names
        raise ConfigError(f"model_type: {model_type!r} is not a type of {name!r} (no {path})")
    defaults = OmegaConf.to_container(read_yaml(path), resolve=True)["model"]
    return OmegaConf.to_container(OmegaConf.merge(defaults, given), resolve=True)


def load_model_and_preprocess(
    name: str = "openflamingo",
    model_type: str | None = None,
    is_eval: bool = True,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    cfg=None,
):
    """``(model, vis_processors, txt_processors)`` as LAVIS returns them, optionally with trained weights.

    ``checkpoint`` is anything :func:`lavis.models.trained.resolve_checkpoint` accepts (a step_*.pt, best.pt,
    run directory, peft adapter folder or OpenFlamingo checkpoint.pt); a training checkpoint alone is
    enough, since it names its model. The processors are dicts keyed by role (``train``, ``eval``).
    """
    from lavis.datasets.processors import build_processor
    from lavis.models.factory import build_model
    from lavis.models.trained import load_trained_weights, model_section_for, resolve_checkpoint

    trained = resolve_checkpoint(checkpoint) if checkpoint is not None else None
    if trained is not None and trained.model_cfg is not None and cfg is None and model_type is None:
        section = model_config(
            trained.model_cfg.get("arch", name), trained.model_cfg.get("model_type"), {"model": trained.model_cfg}
        )
    else:
        section = model_config(name, model_type, cfg)
    if trained is not None:
        section = model_section_for(trained, section)
    model = build_model(section)
    if trained is not None:
        load_trained_weights(model, trained)
    model = model.to(device)
    model.eval() if is_eval else model.train()
    size = int(model.image_size)
    vis_processors = {
        "eval": model.image_processor,
        "train": build_processor({"name": "clip_image_train", "image_size": size}, "vis_processors"),
    }
    txt_processors = {
        "eval": build_processor({"name": "caption_text"}, "txt_processors"),
        "question": build_processor({"name": "question_text"}, "txt_processors"),
    }
    return model, vis_processors, txt_processors
