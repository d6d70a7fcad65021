"""Benchmarks of peft_buffers against stock PEFT, the ``modules_to_save`` workaround and a full checkpoint.

Run from the repository root (this folder is not installed as a package)::

    python -m benchmarks --device cuda          # the real numbers (writes benchmarks/results/cuda/)
    python -m benchmarks --device cpu --quick   # CI smoke run: tiny models, few repetitions

See ``benchmarks/README.md`` for what is measured and how.
"""

__all__: list = []
