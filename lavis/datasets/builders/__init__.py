"""Dataset builders, one module per data set; importing this package registers them."""

from lavis.datasets.builders import coco_caption, shapes, vqav2, webdataset  # noqa: F401
