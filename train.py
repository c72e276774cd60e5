"""Train as a project config says: ``[torchrun --nproc_per_node=N] train.py --cfg-path CFG [--options k=v ...]``."""

from lavis.cli import train_main

if __name__ == "__main__":
    train_main()
