"""Benchmarks of the fused Adafactor step: ``python -m bench`` (see
``bench/__main__.py``). One module per question:

- ``copy_bandwidth``: the machine's memory-copy limit,
- ``optimizer_step``: one optimizer step per parameter set, dtype and arm,
- ``training``: steps per second of a small training loop,
- ``launch_plan``: the Metal launch plan's dispatches and bytes.
"""
