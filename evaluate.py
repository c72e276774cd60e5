"""Few-shot evaluation: ``[torchrun ...] evaluate.py --cfg-path CFG [--checkpoint PATH] [--options k=v ...]``."""

from lavis.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
