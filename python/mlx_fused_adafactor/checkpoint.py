"""Checkpoint and resume: model parameters and optimizer state in one
safetensors file.

>>> save_checkpoint("ckpt.safetensors", model, optimizer)
>>> load_checkpoint("ckpt.safetensors", model, optimizer)  # fresh objects

The file holds ``tree_flatten(model.parameters())`` under the prefix
``model.`` and ``tree_flatten(optimizer.state)`` under ``optimizer.``, so
``optimizer.layers.0.weight.exp_avg_sq_row`` is the row statistic of
``layers.0.weight``. The step count keeps its dtype (safetensors stores
uint64). It works for stock ``mlx.optimizers.Adafactor`` and this package's
class alike: a checkpoint written with one loads into the other, the state
being cast to the layout the loading optimizer keeps (this package: second
moment in float32; stock: the parameter dtype).

:func:`load_optimizer_state` reads the plain format of the MLX documentation,
``mx.save_safetensors(path, dict(tree_flatten(optimizer.state)))``.

Paths follow MLX's rule for safetensors files: ``.safetensors`` is added
unless the path ends with it, so ``save_checkpoint("run1", ...)`` writes
``run1.safetensors`` and ``load_checkpoint("run1", ...)`` reads it (a file
at exactly the given path is read when there is no such file). A missing
file raises ``FileNotFoundError``.

Loading validates everything against the model before it changes anything:
on a truncated file, a missing or extra entry, a shape or dtype that does
not fit, a step count that is negative or not an integer, or a value that is
not an array, it raises ``ValueError`` naming the entry's path, and the model
and the optimizer stay as they were.

A ``MultiOptimizer`` is saved as its ``state`` (``states.<i>.<entry>``) and
loaded the same way, each optimizer's entries checked against the parameters
its filter gives it.
"""

import os

import mlx.core as mx
from mlx.optimizers import MultiOptimizer
from mlx.utils import tree_flatten, tree_map_with_path

FORMAT = "mlx_fused_adafactor.checkpoint/1"
MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."
SUFFIX = ".safetensors"


def checkpoint_path(path):
    """The file ``mx.save_safetensors(path, ...)`` writes: ``path`` with
    ``.safetensors`` added unless it ends with it."""
    name = os.fspath(path)
    return name if name.endswith(SUFFIX) else name + SUFFIX


def save_checkpoint(path, model, optimizer, metadata=None):
    """Write the model's parameters and the optimizer's state to ``path``
    (safetensors; ``.safetensors`` is added unless ``path`` ends with it).
    ``metadata`` (str to str) is stored beside them."""
    arrays = {}
    for key, value in tree_flatten(model.parameters()):
        arrays[MODEL_PREFIX + key] = value
    for key, value in tree_flatten(optimizer.state):
        if not isinstance(value, mx.array):
            raise TypeError(
                f"[adafactor] optimizer state '{key}' is a "
                f"{type(value).__name__}; only arrays can be checkpointed."
            )
        arrays[OPTIMIZER_PREFIX + key] = value
    meta = {
        "format": FORMAT,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
    }
    meta.update(metadata or {})
    mx.save_safetensors(checkpoint_path(path), arrays, metadata=meta)


def load_checkpoint(path, model, optimizer):
    """Load a :func:`save_checkpoint` file into ``model`` and ``optimizer``.

    Returns the file's metadata. Raises ``ValueError`` (naming the offending
    path) and leaves both objects unchanged if the file does not fit them.
    """
    arrays, metadata = _read(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"[adafactor] checkpoint '{path}' is not a {FORMAT} file "
            f"(format {metadata.get('format')!r}); for a file holding only "
            "tree_flatten(optimizer.state) use load_optimizer_state."
        )
    model_flat, opt_flat = {}, {}
    for key, value in arrays.items():
        if key.startswith(MODEL_PREFIX):
            model_flat[key[len(MODEL_PREFIX):]] = value
        elif key.startswith(OPTIMIZER_PREFIX):
            opt_flat[key[len(OPTIMIZER_PREFIX):]] = value
        else:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': unexpected entry '{key}'."
            )
    new_params = _check_model(path, model_flat, model)
    new_state = _check_optimizer_state(
        path, opt_flat, model.trainable_parameters(), optimizer
    )
    model.update(new_params)
    optimizer.state = new_state
    return metadata


def load_optimizer_state(path_or_arrays, model, optimizer):
    """Load ``tree_flatten(optimizer.state)`` (a safetensors file or a dict of
    arrays, as written by stock MLX code) into ``optimizer``, validated
    against ``model``'s trainable parameters; raises ``ValueError`` and leaves
    the optimizer unchanged if it does not fit."""
    if isinstance(path_or_arrays, dict):
        name, arrays = "<dict>", dict(path_or_arrays)
    else:
        name = path_or_arrays
        arrays, _ = _read(path_or_arrays)
    optimizer.state = _check_optimizer_state(
        name, arrays, model.trainable_parameters(), optimizer
    )


def _read(path):
    """The arrays and metadata of the checkpoint at ``path`` (MLX's naming
    rule, else exactly ``path``), evaluated."""
    file = checkpoint_path(path)
    if not os.path.exists(file) and os.path.isfile(os.fspath(path)):
        file = os.fspath(path)
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"[adafactor] checkpoint '{path}': no such file ({file!r})."
        )
    try:
        arrays, metadata = mx.load(file, format="safetensors", return_metadata=True)
        mx.eval(list(arrays.values()))
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(
            f"[adafactor] checkpoint '{path}' could not be read (truncated or "
            f"not a safetensors file): {e}"
        ) from e
    return arrays, metadata


def _check_model(path, flat, model):
    expected = dict(tree_flatten(model.parameters()))
    for key, param in expected.items():
        if key not in flat:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': no value for model "
                f"parameter '{key}'."
            )
        _check_array(
            path, f"model parameter '{key}'", flat[key], param.shape, param.dtype
        )
    for key in flat:
        if key not in expected:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': it has model parameter "
                f"'{key}', which the model does not have."
            )
    return tree_map_with_path(lambda key, _: flat[key], model.parameters())


def _check_array(path, what, value, shape, dtype):
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"[adafactor] checkpoint '{path}': {what} has shape "
            f"{tuple(value.shape)}, expected {tuple(shape)}."
        )
    if value.dtype != dtype:
        raise ValueError(
            f"[adafactor] checkpoint '{path}': {what} has dtype {value.dtype}, "
            f"expected {dtype}."
        )


def _check_optimizer_state(path, flat, params_tree, optimizer, prefix=""):
    """Build the optimizer's new state tree from flattened entries, checked
    entry by entry against what ``optimizer.init_single`` makes for each
    parameter of ``params_tree``; return it without touching the optimizer.
    ``prefix`` is where these entries sit in the file (MultiOptimizer)."""
    for key, value in flat.items():
        if not isinstance(value, mx.array):
            raise ValueError(
                f"[adafactor] checkpoint '{path}': optimizer state "
                f"'{prefix}{key}' is a {type(value).__name__}, not an mlx array."
            )
    if isinstance(optimizer, MultiOptimizer):
        return _check_multi_state(path, flat, params_tree, optimizer, prefix)

    params = dict(tree_flatten(params_tree))
    per_param = {key: {} for key in params}
    scalars = {}
    for key, value in flat.items():
        owner, _, entry = key.rpartition(".")
        if owner in per_param:
            per_param[owner][entry] = value
        elif "." not in key and key not in params:
            scalars[key] = value
        else:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': it has optimizer state "
                f"'{prefix}{key}', which fits no trainable parameter of the "
                "model."
            )

    # The scalars this optimizer keeps: its step, and what it has in its
    # state or schedules (learning_rate).
    kept = {"step"} | set(optimizer._schedulers)
    kept |= {k for k, v in optimizer.state.items() if isinstance(v, mx.array)}
    for key, value in scalars.items():
        if key not in kept:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': it has optimizer state "
                f"'{prefix}{key}', which this optimizer does not keep (it "
                f"keeps {sorted(kept)})."
            )
        if value.ndim != 0:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': optimizer state "
                f"'{prefix}{key}' has shape {tuple(value.shape)}, expected a "
                "scalar."
            )
        is_real = mx.issubdtype(value.dtype, mx.integer) or mx.issubdtype(
            value.dtype, mx.floating
        )
        if value.dtype == mx.bool_ or not is_real:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': optimizer state "
                f"'{prefix}{key}' has dtype {value.dtype}, expected a real "
                "number."
            )
    if "step" not in scalars:
        raise ValueError(
            f"[adafactor] checkpoint '{path}': the optimizer state has no "
            f"'{prefix}step'."
        )
    step = scalars["step"]
    if not mx.issubdtype(step.dtype, mx.integer) or step.item() < 0:
        raise ValueError(
            f"[adafactor] checkpoint '{path}': optimizer '{prefix}step' must be "
            f"an integer >= 0, got {step.item()!r} ({step.dtype})."
        )
    for key, value in scalars.items():
        if key != "step" and not mx.isfinite(value).item():
            raise ValueError(
                f"[adafactor] checkpoint '{path}': optimizer state "
                f"'{prefix}{key}' is {value.item()!r}, expected a finite number."
            )

    if step.item() == 0 and not any(per_param.values()):
        # Saved before the first step: nothing per parameter yet.
        params = {}
    built = {}
    for name, param in params.items():
        template = {}
        optimizer.init_single(param, template)
        got = per_param[name]
        loaded = {}
        for entry, zero in template.items():
            if entry not in got:
                raise ValueError(
                    f"[adafactor] checkpoint '{path}': parameter '{name}' has "
                    f"no optimizer state '{entry}' (it has {sorted(got)}); the "
                    "checkpoint does not fit this model or these optimizer "
                    "options."
                )
            value = got[entry]
            if tuple(value.shape) != tuple(zero.shape):
                raise ValueError(
                    f"[adafactor] checkpoint '{path}': parameter '{name}': "
                    f"optimizer state '{entry}' has shape {tuple(value.shape)}, "
                    f"expected {tuple(zero.shape)}."
                )
            if not mx.issubdtype(value.dtype, mx.floating):
                raise ValueError(
                    f"[adafactor] checkpoint '{path}': parameter '{name}': "
                    f"optimizer state '{entry}' has dtype {value.dtype}, "
                    "expected a float dtype."
                )
            loaded[entry] = value.astype(zero.dtype)
        for entry in got:
            if entry not in template:
                raise ValueError(
                    f"[adafactor] checkpoint '{path}': parameter '{name}' has "
                    f"optimizer state '{entry}', which this optimizer does not "
                    f"keep (it keeps {sorted(template)})."
                )
        built[name] = loaded

    # Mirror the trainable tree, empty subtrees included, as Optimizer.init does.
    new_state = (
        tree_map_with_path(lambda key, _: built[key], params_tree) if built else {}
    )
    for key, value in scalars.items():
        new_state[key] = value
    new_state["step"] = step.astype(optimizer.state["step"].dtype)
    for key, value in optimizer.state.items():
        if key not in new_state and isinstance(value, mx.array):
            new_state[key] = value
    return new_state


def _check_multi_state(path, flat, params_tree, optimizer, prefix):
    """The state of a MultiOptimizer, ``{"states": [...]}``: the entries
    ``states.<i>.*`` of each optimizer, checked against the parameters its
    filter gives it (MultiOptimizer._split_dictionary)."""
    n = len(optimizer.optimizers)
    groups = [{} for _ in range(n)]
    for key, value in flat.items():
        head, index, rest = (key.split(".", 2) + ["", ""])[:3]
        if head != "states" or not index.isdigit() or int(index) >= n or not rest:
            raise ValueError(
                f"[adafactor] checkpoint '{path}': it has optimizer state "
                f"'{prefix}{key}'; a MultiOptimizer of {n} optimizers keeps "
                f"'states.<i>.<entry>' with i < {n}."
            )
        groups[int(index)][rest] = value
    parts = optimizer._split_dictionary(params_tree)
    return {
        "states": [
            _check_optimizer_state(
                path, group, part, sub, f"{prefix}states.{i}."
            )
            for i, (group, part, sub) in enumerate(
                zip(groups, parts, optimizer.optimizers)
            )
        ]
    }
