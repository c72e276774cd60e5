"""Few-shot captioning: OpenFlamingo's evaluation loop (reference-faithful) vs evaluate.py's prediction pass.

Same model weights, same queries, same demonstrations (``FewShotDataset``, random, seeded), same prompts
(the caption eval collator), same decoding (HF beam search with the KV cache: 3 beams, 20 new tokens,
``length_penalty=-2``, eos ``<|endofchunk|>``), fp32, one thread, v1 (release) masking, batch 8.

- **reference**: what OpenFlamingo v1's ``evaluate.py`` does, written from its behaviour: per batch of 8
  queries it loads every query's demonstration images again (the 0-shot text-only ones too, whose images
  the prompt then drops) through open_clip's eval transform (the release's ``image_processor``), builds
  the prompts, stacks ``vision_x``
  (B, shots+1, 1, C, H, W), repeats it ``num_beams`` times *before* encoding, encodes vision tower +
  Perceiver once per generate call, and then every LM call of the beam search (the prompt pass and
  each decoding step) recomputes every cross-attention block's keys/values from the repeated media and
  the dense masked attention over all images (similarity, ``masked_fill``, max subtraction, softmax,
  rows without an image zeroed), under ``torch.inference_mode()``. The Perceiver attention is the
  explicit softmax formula as well. This is what a user would run instead of this project.
- **project**: ``lavis.runners.eval_batches.predict_records``, the pass ``evaluate.py`` runs for every
  shot count and trial: the images through ``clip_image_eval`` (the same pixels, bit for bit, with
  ToTensor and Normalize fused), text-only demonstrations built without reading their images,
  length-bucketed batches, each distinct image encoded once (media cache, cleared before every timed run
  so that no run profits from an earlier one), media keys/values once per generate call shared by the
  beams, no attention where no token attends an image and each token's over its own image's latents
  only, a KV cache reserved once per call (tokens written in place) instead of HF's concatenating
  ``DynamicCache``, holding the prompt once per sample for all its beams (lavis.models.flamingo.shared_prompt).

Both sides must produce the same caption for every query (asserted), and the images must steer the
output (asserted: blank images give other tokens). Runs alternate (reference, project, reference, ...);
min and median are reported, of the process CPU time (both sides are single-threaded, so it is the work
done, and it stays meaningful on a shared machine); the wall-clock ratio is printed beside it.
Models: the tiny OpenFlamingo (tiny.yaml) and a ~40M one built here
(LLaMA hidden 512 x 8 layers, ViT width 256 on 64 px, cross-attention every 4 layers, OpenFlamingo's
Perceiver and cross-attention sizes); gates opened (1.0) so the images matter.

Last line: ``fewshot_eval_speedup=<lowest reference/project median ratio over the 8- and 32-shot cases run>``
(over every case run when none has 8 or more shots).
Every case costs (reference + project) x repeats, plus a project warm-up pass: all six cases with two repeats
take ~9 minutes here (the 40M 32-shot reference alone ~115 s of CPU per run), so ``make bench``
(run_all.py) runs the cases as separate entries of under 5 minutes each. ``--no-warmup`` drops the
warm-up pass; a cold first project run can only raise the project's figures, never the speed-up.
Usage: python benchmarks/fewshot_eval.py [--queries 8] [--repeats 2] [--models tiny,40m] [--shots 0,8,32]
       [--no-warmup]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from release_formulas import release_cross_attention, release_perceiver_attention
from transformers import DynamicCache

from lavis.common.config import read_yaml
from lavis.datasets.builders.shapes import ShapesCaptionBuilder
from lavis.datasets.fewshot import FewShotDataset
from lavis.metrics.postprocess import postprocess_caption
from lavis.models import build_model
from lavis.models.flamingo import flamingo as flamingo_network
from lavis.models.flamingo import generation as flamingo_generation
from lavis.runners.eval_batches import predict_records, shared_media_cache
from lavis.runners.precision import resolve_precision
from lavis.tasks.captioning import CaptioningTask

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
RUN = {
    "num_beams": 3,
    "max_new_tokens": 20,
    "min_new_tokens": 0,
    "length_penalty": -2.0,
    "metrics": ["CIDEr"],
    "agg_metric": "CIDEr",
}
SIZES = {
    "tiny": {},
    "40m": {
        "cross_attn_every_n_layers": 4,
        "perceiver": {},
        "cross_attention": {},
        "tiny": {
            "vision_width": 256,
            "vision_layers": 4,
            "vision_head_width": 64,
            "lm_hidden_size": 512,
            "lm_layers": 8,
            "lm_heads": 8,
            "lm_intermediate_size": 1376,
        },
    },
}


def build(size: str, semantics: str, **overrides):
    """The tiny or ~40M OpenFlamingo with its gates opened (the images steer the output)."""
    cfg = OmegaConf.to_container(read_yaml(REPO / "lavis" / "configs" / "models" / "openflamingo" / "tiny.yaml").model)
    extra = SIZES[size]
    cfg.update({k: v for k, v in extra.items() if k != "tiny"}, xattn_semantics=semantics, **overrides)
    cfg["tiny"] = {**cfg["tiny"], **extra.get("tiny", {}), "max_position_embeddings": 1024}
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return model


# ---------------------------------------------------------------- the reference's computation
@contextlib.contextmanager
def reference_computation(model, beams: int):
    """Within the block the model computes as OpenFlamingo does (see the module docstring)."""
    encode = model.encode_vision
    patched = [
        # Every image slot, padding included (the release has no per-row image count).
        (model, "encode_vision", lambda vision_x, counts=None: encode(vision_x.repeat_interleave(beams, dim=0))),
        # HF's own prompt pass, on every beam row, instead of the once-per-sample prefix.
        (model, "_prefill_once", lambda *args: None),
    ]
    for block in model.gated_cross_attn_layers.values():
        attn = block.attn
        patched += [
            (attn, "media_kv", lambda media: media),  # hand the raw media to every call
            (attn, "forward", (lambda a: lambda x, media, index: release_cross_attention(a, x, media, index))(attn)),
        ]
    for attn, _ in model.perceiver.layers:
        patched.append(
            (attn, "forward", (lambda a: lambda media, lat: release_perceiver_attention(a, media, lat))(attn))
        )
    for obj, name, fn in patched:
        setattr(obj, name, fn)
    # HF's own beam search (generate) and its growing cache (concatenation per token, index_select per
    # beam reorder).
    reserved, settings = flamingo_generation.reserved_cache, flamingo_generation.beam_settings
    flamingo_generation.reserved_cache = lambda config, capacity: DynamicCache(config=config)
    flamingo_generation.beam_settings = lambda config, lm_config: None
    # Every LM call computes its cross-attention, v1 decoding steps included: no check whether a token attends.
    conditioning = flamingo_network._Conditioning
    set_index = conditioning.set_index

    def attend_always(cond, index):
        cond.index, cond.attends = index, True

    conditioning.set_index = attend_always
    try:
        yield
    finally:
        flamingo_generation.reserved_cache, flamingo_generation.beam_settings = reserved, settings
        conditioning.set_index = set_index
        for obj, name, _ in patched:
            delattr(obj, name)


def with_open_clip_preprocessing(splits: dict) -> dict:
    """The splits with the release's image preprocessing: open_clip's eval transform (torchvision's ToTensor
    and Normalize), as OpenFlamingo gets it from ``open_clip.create_model_and_transforms``."""
    import open_clip

    out = {}
    for name, split in splits.items():
        out[name] = copy.copy(split)
        out[name].vis_processor = open_clip.image_transform(split.vis_processor.image_size, is_train=False)
    return out


def reference_loop(model, task, fewshot) -> dict:
    """OpenFlamingo's loop: batches of 8 in query order, every image loaded and encoded again."""
    collate = task.collator(model, "eval")
    captions = {}
    with torch.inference_mode(), reference_computation(model, RUN["num_beams"]):
        for start in range(0, len(fewshot), BATCH):
            batch = collate([fewshot[i] for i in range(start, min(start + BATCH, len(fewshot)))])
            for image_id, text in zip(batch["image_id"], task.generate_text(model, batch)):
                captions[int(image_id)] = postprocess_caption(text)
    return captions


def project_pass(model, task, fewshot) -> dict:
    """evaluate.py's prediction pass (bucketing, media cache, fused cross-attention)."""
    shared_media_cache(model).clear()
    cpu = torch.device("cpu")
    with torch.no_grad():
        records = predict_records(task, model, fewshot, cpu, resolve_precision("fp32", cpu), BATCH, "image_id")
    return {r["image_id"]: r["caption"] for r in records}


def timed(fn, *args):
    """(CPU seconds of this process, wall seconds, result): both sides run on one thread, so the CPU time
    is the work done and stays meaningful on a shared, loaded machine, where wall time mostly measures
    the neighbours."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.process_time() - cpu, time.perf_counter() - wall, out


def secs(seconds: float) -> str:
    """Seconds with three significant digits at least (0-shot runs of the tiny model take ~0.1 s)."""
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.2f}"


def images_matter(model, task, fewshot) -> bool:
    batch = task.collator(model, "eval")([fewshot[i] for i in range(min(BATCH, len(fewshot)))])
    with torch.no_grad():
        real = model.generate(batch["vision_x"], batch["lang_x"], batch["attention_mask"], **task.generation_kwargs())
        blank = model.generate(
            torch.zeros_like(batch["vision_x"]), batch["lang_x"], batch["attention_mask"], **task.generation_kwargs()
        )
    return not torch.equal(real, blank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="tiny,40m")
    parser.add_argument("--shots", default="0,8,32")
    parser.add_argument("--semantics", default="v1", choices=["v1", "v2"])
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the project warm-up pass")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = CaptioningTask(OmegaConf.create({"run": RUN}))
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="fewshot-bench-") as tmp:
        splits = ShapesCaptionBuilder(
            {
                "shapes": {
                    "root": str(Path(tmp) / "shapes"),
                    "num_images": max(200, args.queries * 10),
                    "image_size": 64,
                },
                "train_splits": [],
                "vis_processor": {
                    "train": {"name": "clip_image_eval", "image_size": 64},
                    "eval": {"name": "clip_image_eval", "image_size": 64},
                },
            }
        ).build_datasets()
        release_splits = with_open_clip_preprocessing(splits)
        queries = torch.utils.data.Subset(splits["val"], range(min(args.queries, len(splits["val"]))))
        queries.sample_ids = lambda: [splits["val"].sample_ids()[i] for i in queries.indices]
        for size in args.models.split(","):
            model = build(size, args.semantics)
            params = sum(p.numel() for p in model.parameters())
            for shots in map(int, args.shots.split(",")):
                # OpenFlamingo's 0-shot prompt: two text-only demonstrations.
                # The same draw on both sides; the reference reads the text-only demonstrations' images.
                fewshot, reference_fewshot = (
                    torch.utils.data.Subset(
                        FewShotDataset(
                            (splits if side == "project" else release_splits)["val"],
                            (splits if side == "project" else release_splits)["train"],
                            num_shots=shots,
                            seed=42,
                            zero_shot_text_demos=True,
                            text_demos_keep_images=side == "reference",
                        ),
                        range(len(queries)),
                    )
                    for side in ("project", "reference")
                )
                if args.warmup:
                    project_pass(model, task, fewshot)  # warm-up (allocator, lazy inits)
                times = {"reference": [], "project": []}
                walls = {"reference": [], "project": []}
                outputs = {}
                for _ in range(args.repeats):
                    for side, fn, data in (
                        ("reference", reference_loop, reference_fewshot),
                        ("project", project_pass, fewshot),
                    ):
                        seconds, wall, outputs[side] = timed(fn, model, task, data)
                        times[side].append(seconds)
                        walls[side].append(wall)
                if outputs["reference"] != outputs["project"]:
                    diff = [k for k in outputs["reference"] if outputs["reference"][k] != outputs["project"].get(k)]
                    raise SystemExit(f"{size} {shots}-shot: captions differ for image ids {diff[:5]}")
                if not images_matter(model, task, fewshot):
                    raise SystemExit(f"{size} {shots}-shot: the images do not change the output; the check is vacuous")
                ref, ours = times["reference"], times["project"]
                ratio = statistics.median(ref) / statistics.median(ours)
                ratios[size, shots] = ratio
                cache = shared_media_cache(model)
                wall_ratio = statistics.median(walls["reference"]) / statistics.median(walls["project"])
                print(
                    f"{size} ({params / 1e6:.1f}M params) {shots}-shot, {len(fewshot)} queries, CPU s: reference "
                    f"min {secs(min(ref))} median {secs(statistics.median(ref))} | project min {secs(min(ours))} "
                    f"median {secs(statistics.median(ours))} | speed-up median {ratio:.2f}x, min "
                    f"{min(ref) / min(ours):.2f}x (wall clock median {wall_ratio:.2f}x) | same captions | "
                    f"media cache {len(cache)} images, {cache.nbytes / 2**20:.2f} MiB",
                    flush=True,
                )
            del model
    for (size, shots), ratio in ratios.items():
        print(f"fewshot_{size}_{shots}shot_speedup={ratio:.2f}")
    headline = [r for (_, shots), r in ratios.items() if shots >= 8] or list(ratios.values())
    print(f"fewshot_eval_speedup={min(headline):.2f}")


if __name__ == "__main__":
    main()
