"""Multi-process runs (issue 13): DDP + SyncBatchNorm, plain BatchNorm under DDP, FSDP2, accelerate's FSDP2
plugin, DeepSpeed ZeRO-3. Entry point: ``python -m benchmarks.distributed --device cuda --world-size 2``."""
