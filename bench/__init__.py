"""Benchmarks of the fused Adafactor step: ``python -m bench`` (see
``bench/__main__.py``). One module per question:

- ``copy_bandwidth``: the machine's memory-copy limit,
- ``optimizer_step``: one optimizer step per parameter set, dtype and arm,
- ``training``: steps per second of a small training loop.

What one GPU step would launch is computed from the launch plan by
``tests/metal/plan_summary.py`` (it needs the Metal emulator, not a timer).
"""
