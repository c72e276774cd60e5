"""Parts of benchmarks/gpu_check.py: ``common`` (the helpers every check uses) and ``throughput`` (the LoRA-step
throughput and MFU check). A package, not scripts: benchmarks/*.py are the runnable ones."""
