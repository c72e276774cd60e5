"""Encode each image once per evaluation: an LRU of Perceiver outputs keyed by image content and model.

With the vision tower and the Perceiver frozen, an image's latents depend only on its pixels and on
those weights, and each image is encoded on its own (no attention across images), so a demonstration
shown to many queries, or a query evaluated at several shot counts, needs one encoding.

Keys: (model fingerprint, digest of the image's processed pixels). The pixel digest stands in for the
image id and is stronger: two datasets that reuse an id never collide, and an image processed
differently (another processor, an augmentation) is simply a miss. The fingerprint is a digest of the
vision tower's and the Perceiver's weights, so a new checkpoint, or a validation pass after more
training, never reuses stale latents; :meth:`MediaCache.bind` drops the entries of another fingerprint.
Memory is bounded by ``max_bytes`` (least recently used entries go first) and reported by
:attr:`MediaCache.nbytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: 4096 latent sets of OpenFlamingo-9B (64 x 1024 floats each)


def tensor_digest(tensor: torch.Tensor, hasher=None) -> bytes:
    """SHA-256 digest of a tensor's bytes, shape and dtype (a host copy is made for device tensors).

    SHA-256 rather than blake2b: CPUs with SHA extensions hash about twice as fast with it, and the
    fingerprint hashes every vision and Perceiver weight once per evaluation pass.
    """
    h = hasher or hashlib.sha256()
    data = tensor.detach().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    h.update(repr((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> bytes:
    """Digest of every parameter and buffer (names included) of ``modules``."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            h.update(name.encode())
            tensor_digest(tensor, h)
    return h.digest()


class MediaCache:
    """LRU of per-image latents (n_latents, D) of one model; see the module docstring."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"MediaCache max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.fingerprint: bytes | None = None
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def bind(self, fingerprint: bytes) -> None:
        """Serve the model with this weights fingerprint; entries of another one are dropped."""
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self.nbytes = 0

    def _put(self, key: bytes, latents: torch.Tensor) -> None:
        size = latents.numel() * latents.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = latents
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()

    def encode(self, vision_x: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Latents (B, T_img, n, D) of vision_x (B, T_img, F, C, H, W); ``encode`` runs on the misses only.

        ``encode`` maps (M, 1, F, C, H, W) to (M, 1, n, D); a batch's repeated images are encoded once.
        """
        b, t = vision_x.shape[:2]
        media = vision_x.reshape(b * t, *vision_x.shape[2:])
        keys = [tensor_digest(m) for m in media]
        missing: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
            elif key not in missing:
                missing[key] = i
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            latents = encode(media[list(missing.values())][:, None])[:, 0]
            for key, lat in zip(missing, latents):
                fresh[key] = lat.clone()  # own storage: a view would keep the whole batch alive
                self._put(key, fresh[key])
        out = torch.stack([fresh[k] if k in fresh else self._entries[k] for k in keys])
        return out.reshape(b, t, *out.shape[1:])


@contextlib.contextmanager
def media_cache_enabled(model, cache: MediaCache):
    """Within the block ``model.encode_vision`` goes through ``cache`` (only when no gradient is recorded).

    The cache is bound to the current weights of the model's vision tower and Perceiver first.
    """
    cache.bind(weights_fingerprint([model.vision_encoder, model.perceiver]))
    previous, model.media_cache = model.media_cache, cache
    try:
        yield cache
    finally:
        model.media_cache = previous
