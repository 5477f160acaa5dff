"""The drop-in Adafactor class.

It keeps what the optimizer API needs in Python: the constructor and its
defaults, the tree walk, schedules, the step count, and committing the new
state. Everything else belongs to the extension: the hyper-parameters are an
``_ext.Hyper`` (validated there), the state layout and the checks of the
state are ``_ext.init_state`` and ``_ext.apply_leaves``, and the step is one
fused operation per dtype group (csrc/op/adafactor.h), which also decides
per stream whether the fused kernels or the pure-MLX implementation run.
"""

import warnings
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
import mlx.optimizers.optimizers as _stock
from mlx.optimizers import Optimizer

from ._build import ext as _ext

# The stock class, whose helper methods this class shares.
_StockAdafactor = _stock.Adafactor
_ZERO = mx.array(0.0, mx.float32)


class Adafactor(Optimizer):
    r"""The Adafactor optimizer, fused.

    A drop-in replacement for :class:`mlx.optimizers.Adafactor` with the same
    constructor, the same state tree, and the same results in float32. Each
    step runs as one fused operation per dtype group; all arithmetic is
    float32 whatever the parameter dtype, and the second-moment state is kept
    in float32 (see the README's numerics contract). float64 parameters are
    the exception: their step is computed, and their state kept, in float64.

    Args:
        learning_rate (float or callable, optional): The learning rate, used
            when ``relative_step`` is ``False``. Default: ``None``.
        eps (tuple(float, float), optional): :math:`\epsilon_1` added to the
            squared gradient and :math:`\epsilon_2`, the floor of the
            parameter scale. Default: ``(1e-30, 1e-3)``.
        clip_threshold (float, optional): Clips the unscaled update at this
            RMS. Default: ``1.0``.
        decay_rate (float, optional): Second-moment decay,
            :math:`\beta_2 = 1 - t^{\text{decay\_rate}}`. Default: ``-0.8``.
        beta_1 (float, optional): If set, the first moment is used with this
            coefficient. Default: ``None``.
        weight_decay (float, optional): The weight decay :math:`\lambda`.
            Default: ``0.0``.
        scale_parameter (bool, optional): Scale the learning rate by
            :math:`\max(\epsilon_2, \text{RMS}(w_{t-1}))`. Default: ``True``.
        relative_step (bool, optional): Use the relative step size instead of
            ``learning_rate``. Default: ``True``.
        warmup_init (bool, optional): Relative step size grows with the step
            count. Default: ``False``.
        stochastic_rounding (bool, optional, keyword only): Round the new
            bfloat16 and float16 parameters and ``exp_avg`` stochastically
            from their float32 values. Default: ``False``.
        seed (int, optional, keyword only): Seed of the stochastic rounding,
            in ``[0, 2**32)``; the random bits are a function of the seed,
            the parameter's path, the step count and the element. Default:
            ``0``.
        shard_group (mlx.core.distributed.Group, optional, keyword only):
            Every parameter is this rank's axis-0 shard of a tensor split
            evenly over the group (``nn.fully_shard``'s layout); the step
            sums its statistics over the group, so every rank applies the
            update of the whole tensor. :meth:`update` finds the group of a
            ``FullyShardedModule`` itself. Default: ``None``.
    """

    def __init__(
        self,
        learning_rate: Union[float, Callable[[mx.array], mx.array], None] = None,
        eps: Tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta_1: Optional[float] = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        stochastic_rounding: bool = False,
        seed: int = 0,
        shard_group: Optional[mx.distributed.Group] = None,
    ):
        # Every argument but the learning rate is an option of _ext.Hyper,
        # which validates it (NOTE: [hyper-parameters]).
        arguments = locals()
        options = {name: arguments[name] for name in _ext.Hyper.OPTIONS}
        super().__init__()
        self._hyper = _ext.Hyper(**options)
        self.shard_group = shard_group
        # Groups of the FullyShardedModules of the model being updated.
        self._module_groups = {}
        # The values as given, for reading them back (stock keeps them so).
        self._options = options
        if learning_rate is not None:
            if relative_step:
                warnings.warn(
                    "[adafactor] learning_rate is ignored while "
                    "relative_step=True (the step size is computed from the "
                    "step count); pass relative_step=False to use it.",
                    UserWarning,
                    stacklevel=2,
                )
            if not callable(learning_rate):
                _ext.check_learning_rate(learning_rate)
            self._maybe_schedule("learning_rate", learning_rate)
            if not isinstance(self._state["learning_rate"], mx.array):
                # A schedule returning a Python or NumPy number.
                self._state["learning_rate"] = mx.array(self._state["learning_rate"])
        elif not relative_step:
            raise ValueError("[adafactor] relative_step=False needs a learning_rate.")

    @Optimizer.learning_rate.setter
    def learning_rate(self, learning_rate):
        # Checked as in the constructor before the state changes.
        _ext.check_learning_rate(learning_rate)
        self._state["learning_rate"] = mx.array(learning_rate)

    @property
    def shard_group(self):
        """The group every parameter is a shard of, or None."""
        return self._shard_group

    @shard_group.setter
    def shard_group(self, group):
        if group is not None and not isinstance(group, mx.distributed.Group):
            raise TypeError(
                "[adafactor] shard_group must be an mlx.core.distributed.Group "
                f"or None, got {type(group).__name__}."
            )
        self._shard_group = group

    @property
    def hyper(self):
        """The typed hyper-parameters of this optimizer (a copy)."""
        return _ext.Hyper(**self._options)

    # ------------------------------------------------------------------ state

    def init_single(self, parameter: mx.array, state: dict):
        """Initialize the state of one parameter (the stock layout)."""
        if _is_numpy(parameter):
            # Optimizer.init(gradients) with NumPy gradients.
            parameter = mx.array(parameter)
        state.update(_ext.init_state(parameter, self._hyper))

    # ------------------------------------------------------------------- step

    def update(self, model, gradients: dict):
        """Apply the gradients to the model's parameters. The parameters of
        an ``nn.FullyShardedModule`` in ``model`` are stepped as shards of
        its group (NOTE: [sharded step] in csrc/op/reference.h)."""
        self._module_groups = _fully_sharded_groups(model)
        try:
            model.update(self.apply_gradients(gradients, model))
        finally:
            self._module_groups = {}

    def apply_gradients(self, gradients: dict, parameters: dict):
        """Apply the gradients and return the updated parameters.

        ``parameters`` may be a superset of ``gradients``; the result has the
        structure of ``gradients``. On bad input this raises before anything
        is changed: parameters and optimizer state stay as they were.
        """
        old_step = _ext.step_count(self._state)
        leaves = []
        _collect(gradients, parameters, self._state, (), "", leaves)
        scheduled = {k: fn(old_step) for k, fn in self._schedulers.items()}
        step = old_step + 1
        new_params, new_states = self._run(
            step, self._learning_rate(scheduled), leaves
        )

        # Nothing has changed so far; commit the step.
        if not self._initialized or any(
            leaf.state is _MISSING for leaf in leaves
        ):
            self.init(gradients)
        for k, v in scheduled.items():
            # A schedule may return a Python or NumPy number; the state
            # keeps arrays (stock's _maybe_schedule keeps what it returns).
            self._state[k] = v if isinstance(v, mx.array) else mx.array(v)
        self._state["step"] = step
        for leaf, new_state in zip(leaves, new_states):
            state = leaf.state
            if state is _MISSING:
                state = _lookup(self._state, leaf.keys)
            state.update(new_state)
        return _rebuild(gradients, iter(new_params))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """Update one parameter with the current step count; ``state`` is
        updated in place. Provided for code that drives optimizers per
        parameter; :meth:`apply_gradients` fuses all parameters instead."""
        if _is_numpy(gradient):
            gradient = mx.array(gradient)
        leaf = _Leaf((), "<single>", gradient, parameter, state)
        new_params, new_states = self._run(
            _ext.step_count(self._state), self._learning_rate({}), [leaf]
        )
        state.update(new_states[0])
        return new_params[0]

    def _learning_rate(self, scheduled):
        """The learning rate of this step as given (a schedule's value or
        the state's); apply_leaves checks it."""
        if self.relative_step:
            return _ZERO
        if "learning_rate" in scheduled:
            return scheduled["learning_rate"]
        if "learning_rate" not in self._state:
            raise ValueError(
                "[adafactor] relative_step=False needs a learning rate, and "
                "the state has none."
            )
        return self._state["learning_rate"]

    def _run(self, step, learning_rate, leaves):
        """New parameters and state dicts of validated leaves, in order;
        changes nothing (NOTE: [leaves in C++])."""
        states = []
        for leaf in leaves:
            state = leaf.state
            if state is _MISSING:
                state = {}
                self.init_single(leaf.param, state)
            states.append(state)
        return _ext.apply_leaves(
            step,
            learning_rate,
            [leaf.param for leaf in leaves],
            [leaf.grad for leaf in leaves],
            states,
            [leaf.name for leaf in leaves],
            self._hyper,
            self._shard_groups(leaves),
        )

    def _shard_groups(self, leaves):
        """Each leaf's shard group, or None when nothing is sharded."""
        if self._shard_group is not None:
            return [self._shard_group] * len(leaves)
        if not self._module_groups:
            return None
        groups = []
        for leaf in leaves:
            group = None
            for prefix, g in self._module_groups.items():
                if not prefix or leaf.name == prefix or leaf.name.startswith(prefix + "."):
                    group = g
            groups.append(group)
        return groups

    # Stock's helpers, with stock's behaviour, for code that calls them.
    _compute_rms = _StockAdafactor._compute_rms
    _compute_learning_rate = _StockAdafactor._compute_learning_rate
    _approximate_exp_moving_avg = _StockAdafactor._approximate_exp_moving_avg


def _option(name):
    """The attribute of option ``name``: assignments are validated (by
    ``_ext.Hyper``) before they change anything, and read back as given."""

    def get(self):
        return self._options[name]

    def set(self, value):
        setattr(self._hyper, name, value)
        self._options[name] = value

    return property(get, set, doc=f"The ``{name}`` option (see the class).")


for _name in _ext.Hyper.OPTIONS:
    setattr(Adafactor, _name, _option(_name))


def _fully_sharded_groups(model):
    """{path of each nn.FullyShardedModule in ``model``: its group}."""
    import mlx.nn as nn

    modules = getattr(model, "named_modules", None)
    if modules is None:
        return {}
    return {path: _group_of(module) for path, module in modules()
            if isinstance(module, nn.FullyShardedModule)}


def _group_of(module):
    """The group of an nn.FullyShardedModule. MLX keeps it only in the
    closure of the module's gather function (mlx/nn/layers/distributed.py,
    MLX 0.32, the version this package is built for)."""
    import gc

    for ref in gc.get_referents(module._gather_fn):
        for cell in getattr(ref, "__closure__", None) or ():
            if isinstance(cell.cell_contents, mx.distributed.Group):
                return cell.cell_contents
    raise ValueError(
        "[adafactor] cannot find the group of a FullyShardedModule; pass "
        "Adafactor(shard_group=...)."
    )


def hyper_parameters(**options):
    """The typed hyper-parameters of ``Adafactor(**options)``; options not
    given take the constructor's defaults."""
    return Adafactor(**options).hyper


class _Leaf:
    """A gradient array with its parameter, its state (_MISSING when it
    has none yet) and its path (keys, and the dotted name errors use)."""

    __slots__ = ("keys", "name", "grad", "param", "state")

    def __init__(self, keys, name, grad, param, state):
        self.keys = keys
        self.name = name
        self.grad = grad
        self.param = param
        self.state = state


# No state at this path yet (a key or list entry the state does not have).
_MISSING = object()


def _is_numpy(x):
    """A NumPy array or scalar, recognized without importing NumPy (not a
    dependency of this package)."""
    return type(x).__module__ == "numpy" and hasattr(x, "dtype")


def _kind(tree):
    if isinstance(tree, dict):
        return "a dict"
    if isinstance(tree, (list, tuple)):
        return f"a {type(tree).__name__} of {len(tree)}"
    return f"a {type(tree).__name__}"


def _collect(grads, params, state, keys, name, out):
    """Walk the gradient tree with the parameter and state trees beside it,
    validating their structure; append a _Leaf per gradient array.

    This owns the structure of the trees: every container of the state
    along the gradients must be the kind the parameters have there (dict
    for dict, list or tuple for list or tuple), or absent. What the state of
    one parameter holds is checked by _ext.apply_leaves (NOTE: [leaves in
    C++]). So a malformed state raises here or there, naming the path,
    before anything changes, and the commit in apply_gradients (stock's
    Optimizer.init) always finds the structure it expects.
    """
    where = name or "<root>"
    if isinstance(grads, mx.array) or _is_numpy(grads):
        if not isinstance(params, mx.array):
            raise ValueError(
                f"[adafactor] parameter '{where}': the gradient is an array "
                f"where the parameters have {_kind(params)}."
            )
        if not isinstance(grads, mx.array):
            # A NumPy gradient becomes the array stock's first op on it
            # (mx.square) makes of it.
            grads = mx.array(grads)
        # An empty dict is a state not made yet (Optimizer.init's {}); any
        # other value goes to apply_leaves, which checks it.
        fresh = state is _MISSING or (isinstance(state, dict) and not state)
        out.append(_Leaf(keys, name, grads, params, _MISSING if fresh else state))
        return
    if isinstance(grads, dict):
        kind = dict
    elif isinstance(grads, (list, tuple)):
        kind = (list, tuple)
    else:
        raise TypeError(
            f"[adafactor] gradient '{where}' is a {type(grads).__name__}, "
            "expected an mlx.core.array."
        )
    if state is not _MISSING and not isinstance(state, kind):
        raise ValueError(
            f"[adafactor] parameter '{where}': the optimizer state holds "
            f"{_kind(state)} where the gradients have {_kind(grads)}."
        )
    if not grads:
        # Module.trainable_parameters() maps non-array attributes to empty
        # containers; there is nothing to update under them (as in stock).
        return
    if not isinstance(params, kind) or (
        kind is not dict and len(params) < len(grads)
    ):
        raise ValueError(
            f"[adafactor] parameter '{where}': the gradients have "
            f"{_kind(grads)} where the parameters have {_kind(params)}."
        )
    prefix = name + "." if name else ""
    if isinstance(grads, dict):
        for k, g in grads.items():
            if k not in params:
                raise ValueError(
                    f"[adafactor] parameter '{prefix}{k}': there is a gradient "
                    "but no such parameter."
                )
            sub = _MISSING if state is _MISSING else state.get(k, _MISSING)
            _collect(g, params[k], sub, keys + (k,), f"{prefix}{k}", out)
    else:
        for i, g in enumerate(grads):
            has = state is not _MISSING and i < len(state)
            sub = state[i] if has else _MISSING
            _collect(g, params[i], sub, keys + (i,), f"{prefix}{i}", out)


def _lookup(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _rebuild(grads, new_params):
    """The gradient tree with its arrays replaced, in _collect's order, by
    the items of the iterator ``new_params``."""
    if isinstance(grads, dict):
        return {k: _rebuild(v, new_params) for k, v in grads.items()}
    if isinstance(grads, (list, tuple)):
        return type(grads)(_rebuild(v, new_params) for v in grads)
    return next(new_params)
