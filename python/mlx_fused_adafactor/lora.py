"""mlx-lm's fine-tuning command line, with the fused Adafactor.

    python -m mlx_fused_adafactor.lora --model PATH --train --data DIR \\
        --optimizer adafactor [any other mlx_lm.lora argument]

takes exactly ``mlx_lm.lora``'s arguments and runs mlx-lm's own entry point
(``mlx_lm.lora.main``) with ``mlx.optimizers.Adafactor`` set to this
package's class (:func:`mlx_fused_adafactor.patch_mlx`). mlx-lm builds the
optimizer as ``Adafactor(learning_rate=..., **optimizer_config["adafactor"])``,
so ``--optimizer adafactor`` and the ``optimizer_config`` of its YAML config,
``stochastic_rounding`` and ``seed`` included, reach the fused class.
"""

import sys

from .patch import patch_mlx

# How the usage line names this command.
PROG = "python -m mlx_fused_adafactor.lora"


def main(argv=None):
    """Run ``mlx_lm.lora.main`` on ``argv`` (default: the command line's
    arguments) with the fused Adafactor in place of stock's."""
    try:
        from mlx_lm import lora
    except ImportError as e:
        raise SystemExit(
            f"[adafactor] {PROG} runs mlx-lm's lora entry point, and mlx-lm "
            f"is not installed ({e}): pip install mlx-lm"
        ) from e
    # mlx-lm's parser reads sys.argv; argparse names the program after argv[0].
    args = sys.argv[1:] if argv is None else list(argv)
    saved = sys.argv
    sys.argv = [PROG, *args]
    try:
        with patch_mlx():
            lora.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
