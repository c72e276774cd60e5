"""The special tokens OpenFlamingo adds to its language model's tokenizer, and the label of a position
without a target (the one definition of each).

Here, at the bottom of the import graph, so that the prompt formats (lavis.datasets.prompts), the
tokenizers (lavis.models.flamingo.tokenizer), the adapters and the report share them without any of
them importing another package.
"""

MEDIA_TOKEN = "<image>"  # where an image is attended (one per image, before its text)
END_OF_CHUNK = "<|endofchunk|>"  # ends each (image, text) chunk; generation stops on it
PAD_TOKEN = "<PAD>"  # added as the pad token when the tokenizer has none
IGNORE_INDEX = -100  # the label of a position without a target (HF's cross-entropy ignore_index)
