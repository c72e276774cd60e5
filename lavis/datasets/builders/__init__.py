"""Dataset builders, one module per data set; importing this package registers them."""

from lavis.datasets.builders import (  # noqa: F401
    coco_caption,
    flickr30k,
    hateful_memes,
    imagenet,
    okvqa,
    shapes,
    shapes_suite,
    textvqa,
    vizwiz,
    vqav2,
    webdataset,
)
