"""Load the compiled extension, refusing an MLX it was not compiled for.

The extension links against libmlx's C++ ABI, which changes between MLX
releases. Loading it into a different MLX would fail with an undefined-symbol
trace or crash later, so the version recorded at build time is compared with
the running MLX before the shared library is touched.
"""

import mlx.core as mx

REBUILD_HINT = (
    "Rebuild it against the installed MLX with:\n"
    "    pip install --no-build-isolation --no-deps --force-reinstall "
    "--no-cache-dir mlx-fused-adafactor\n"
    "(from a source checkout: pip install --no-build-isolation --force-reinstall .)"
)


def _load():
    try:
        from . import _build_info
    except ImportError as e:
        raise ImportError(
            "mlx_fused_adafactor is not built: its compiled extension is "
            "missing. Install the package with `pip install .` (or "
            "`pip install mlx-fused-adafactor`) instead of importing it from "
            "the source tree."
        ) from e
    built = _build_info.MLX_BUILD_VERSION
    running = mx.__version__
    if built != running:
        raise ImportError(
            f"mlx_fused_adafactor was compiled for MLX {built}, but MLX "
            f"{running} is installed; the extension only runs with the MLX it "
            f"was compiled for. {REBUILD_HINT}"
        )
    from . import _ext

    return _ext


ext = _load()
