"""Datasets: builders (registered by name), processors, prompts and few-shot sampling.

Importing this package registers every builder and processor.
"""

from lavis.datasets import builders, fewshot, processors, prompts  # noqa: F401
