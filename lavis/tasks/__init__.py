"""Tasks register themselves on import."""

from lavis.tasks import caption_vqa, captioning, classification, vqa  # noqa: F401
from lavis.tasks.base import BaseTask

__all__ = ["BaseTask"]
