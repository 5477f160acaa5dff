"""The drop-in Adafactor class.

Thin by design: it validates, lays out the state exactly as
``mlx.optimizers.Adafactor`` does, and hands every parameter of a dtype group
to one fused operation per step (csrc/adafactor.h: eager on the CPU outside
transformations, AdafactorStep primitives otherwise). The math lives in
kernels/adafactor_math.h.
"""

import math
import warnings
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from ._build import ext as _ext
from .reference import adafactor_reference

_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_ROW, _COL, _SQ = "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"
_FACTORED_KEYS = (_ROW, _COL)
_FLAT_KEYS = (_SQ,)
_ZERO = mx.array(0.0, mx.float32)

_fallback_warned = False


def _state_shapes(shape):
    if len(shape) >= 2:
        return {
            _ROW: tuple(shape[:-1]),
            _COL: tuple(shape[:-2]) + tuple(shape[-1:]),
        }
    return {_SQ: tuple(shape)}


class Adafactor(Optimizer):
    r"""The Adafactor optimizer, fused.

    A drop-in replacement for :class:`mlx.optimizers.Adafactor` with the same
    constructor, the same state tree, and the same results in float32. Each
    step runs as one fused operation per dtype group; all arithmetic is
    float32 whatever the parameter dtype, and the second-moment state is kept
    in float32 (see the README's numerics contract).

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
    ):
        _check_hyper(
            learning_rate, eps, clip_threshold, decay_rate, beta_1, weight_decay,
            relative_step,
        )
        super().__init__()
        if learning_rate is not None:
            if relative_step:
                warnings.warn(
                    "[adafactor] learning_rate is ignored while "
                    "relative_step=True (the step size is computed from the "
                    "step count); pass relative_step=False to use it.",
                    UserWarning,
                    stacklevel=2,
                )
            self._maybe_schedule("learning_rate", learning_rate)
        self.eps = tuple(eps)
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.beta_1 = beta_1
        self.weight_decay = weight_decay
        self.scale_parameter = scale_parameter
        self.relative_step = relative_step
        self.warmup_init = warmup_init

    # ------------------------------------------------------------------ state

    def init_single(self, parameter: mx.array, state: dict):
        """Initialize the state of one parameter (the stock layout)."""
        for key, shape in _state_shapes(parameter.shape).items():
            state[key] = mx.zeros(shape, dtype=mx.float32)
        if self.beta_1 is not None:
            state["exp_avg"] = mx.zeros_like(parameter)

    # ------------------------------------------------------------------- step

    def apply_gradients(self, gradients: dict, parameters: dict):
        """Apply the gradients and return the updated parameters.

        ``parameters`` may be a superset of ``gradients``; the result has the
        structure of ``gradients``. On bad input this raises before anything
        is changed: parameters and optimizer state stay as they were.
        """
        leaves = []
        _collect(gradients, parameters, self._state, (), "", leaves)
        scheduled = {k: fn(self.step) for k, fn in self._schedulers.items()}
        learning_rate = self._learning_rate(scheduled)
        step = self.step + 1
        new_params, staged = self._run(step, learning_rate, leaves)

        # Nothing has changed so far; commit the step.
        if not self._initialized or any(leaf[4] is None for leaf in leaves):
            self.init(gradients)
        for k, v in scheduled.items():
            self._state[k] = v
        self._state["step"] = step
        for leaf, new_state in zip(leaves, staged):
            state = leaf[4]
            if state is None:
                state = _lookup(self._state, leaf[0])
            state.update(new_state)
        return _rebuild(gradients, iter(new_params))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """Update one parameter with the current step count; ``state`` is
        updated in place. Provided for code that drives optimizers per
        parameter; :meth:`apply_gradients` fuses all parameters instead."""
        if not isinstance(gradient, mx.array) or not isinstance(parameter, mx.array):
            raise TypeError("[adafactor] apply_single takes mlx arrays.")
        leaf = (("<single>",), "<single>", gradient, parameter, state or None)
        learning_rate = self._learning_rate({})
        new_params, staged = self._run(self.step, learning_rate, [leaf])
        state.update(staged[0])
        return new_params[0]

    def _learning_rate(self, scheduled):
        if self.relative_step:
            return _ZERO
        if "learning_rate" in scheduled:
            return mx.array(scheduled["learning_rate"])
        if "learning_rate" not in self._state:
            raise ValueError(
                "[adafactor] relative_step=False needs a learning rate, and "
                "the state has none."
            )
        return mx.array(self._state["learning_rate"])

    def _hyper(self):
        return dict(
            eps=self.eps,
            clip_threshold=self.clip_threshold,
            decay_rate=self.decay_rate,
            beta_1=self.beta_1,
            weight_decay=self.weight_decay,
            scale_parameter=self.scale_parameter,
            relative_step=self.relative_step,
            warmup_init=self.warmup_init,
        )

    def _input_state(self, leaf, keys, dtype):
        """The state arrays of a leaf in slot order, cast to what the kernel
        takes (second moment in float32, exp_avg in the parameter dtype).
        A leaf without state starts from zeros, as init_single would."""
        state = leaf[4]
        if state is None:
            state = {}
            self.init_single(leaf[3], state)
        try:
            arrays = [state[k] for k in keys]
            if self.beta_1 is not None:
                arrays.append(state["exp_avg"])
        except KeyError as e:
            raise ValueError(
                f"[adafactor] parameter '{leaf[1]}': state has no {e}; it has "
                f"{sorted(state)}, which does not fit this parameter or these "
                "optimizer options."
            ) from None
        try:
            for i, a in enumerate(arrays):
                want = dtype if i == len(keys) else mx.float32
                if a.dtype != want:
                    arrays[i] = a.astype(want)
        except (AttributeError, TypeError, ValueError):
            raise ValueError(
                f"[adafactor] parameter '{leaf[1]}': a state entry is a "
                f"{type(a).__name__}, not a float mlx array."
            ) from None
        return arrays

    def _run(self, step, learning_rate, leaves):
        """Compute the step for validated leaves without changing anything.
        Returns, in leaf order, the new parameters and the new state dicts."""
        device = mx.default_device()
        if device != mx.cpu and not _ext.has_metal_kernels:
            return self._fallback_run(step, learning_rate, leaves)
        states = []
        for leaf in leaves:
            state = leaf[4]
            if state is None:
                state = {}
                self.init_single(leaf[3], state)
            states.append(state)
        beta_1 = 0.0 if self.beta_1 is None else float(self.beta_1)
        hyper = (
            self.eps[0],
            self.eps[1],
            self.clip_threshold,
            self.decay_rate,
            beta_1,
            1.0 - beta_1,
            self.weight_decay,
            self._flags(),
        )
        # See NOTE: [leaves in C++] (csrc/bindings_leaves.cpp).
        return _ext.apply_leaves(
            step,
            learning_rate,
            [leaf[3] for leaf in leaves],
            [leaf[2] for leaf in leaves],
            states,
            [leaf[1] for leaf in leaves],
            hyper,
        )

    def _flags(self):
        flags = 0
        if self.scale_parameter:
            flags |= _ext.SCALE_PARAMETER
        if self.relative_step:
            flags |= _ext.RELATIVE_STEP
        if self.warmup_init:
            flags |= _ext.WARMUP_INIT
        if self.beta_1 is not None:
            flags |= _ext.MOMENTUM
        if self.weight_decay != 0:
            flags |= _ext.WEIGHT_DECAY
        return flags

    def _fallback_run(self, step, learning_rate, leaves):
        global _fallback_warned
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(
                f"[adafactor] no fused kernel for {mx.default_device()} in "
                "this build; running the compiled pure-MLX implementation of "
                "the same float32 math.",
                RuntimeWarning,
                stacklevel=4,
            )
        fn = _compiled_reference(tuple(sorted(self._hyper().items())))
        new_params = []
        staged = []
        for leaf in leaves:
            _check_dtypes(leaf[3].dtype, leaf[2].dtype, leaf)
            if leaf[2].shape != leaf[3].shape:
                raise ValueError(
                    f"[adafactor] parameter '{leaf[1]}': gradient shape "
                    f"{leaf[2].shape} does not match parameter shape "
                    f"{leaf[3].shape}."
                )
            keys = _FACTORED_KEYS if leaf[3].ndim >= 2 else _FLAT_KEYS
            arrays = self._input_state(leaf, keys, leaf[3].dtype)
            state = dict(zip(keys, arrays))
            if self.beta_1 is not None:
                state["exp_avg"] = arrays[-1]
            _check_state_shapes(leaf, state)
            p, st = fn(step, learning_rate, leaf[3], leaf[2], state)
            new_params.append(p)
            staged.append(st)
        return new_params, staged


_compiled_cache = {}


def _compiled_reference(hyper_items):
    fn = _compiled_cache.get(hyper_items)
    if fn is None:
        hyper = dict(hyper_items)

        def step_fn(step, learning_rate, parameter, gradient, state):
            return adafactor_reference(
                step, learning_rate, parameter, gradient, state, **hyper
            )

        fn = _compiled_cache[hyper_items] = mx.compile(step_fn)
    return fn


def _check_hyper(
    learning_rate, eps, clip_threshold, decay_rate, beta_1, weight_decay,
    relative_step,
):
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if (
        not isinstance(eps, (tuple, list))
        or len(eps) != 2
        or not all(number(e) and e >= 0 and math.isfinite(e) for e in eps)
    ):
        raise ValueError(
            f"[adafactor] eps must be a pair of non-negative floats, got {eps!r}."
        )
    if not number(clip_threshold) or not clip_threshold > 0:
        raise ValueError(
            f"[adafactor] clip_threshold must be > 0, got {clip_threshold!r}."
        )
    if not number(decay_rate) or not decay_rate < 0:
        raise ValueError(
            "[adafactor] decay_rate must be < 0 (beta_2 = 1 - t^decay_rate), "
            f"got {decay_rate!r}."
        )
    if beta_1 is not None and (not number(beta_1) or not 0 <= beta_1 < 1):
        raise ValueError(f"[adafactor] beta_1 must be in [0, 1), got {beta_1!r}.")
    if not number(weight_decay) or not weight_decay >= 0:
        raise ValueError(
            f"[adafactor] weight_decay must be >= 0, got {weight_decay!r}."
        )
    if not relative_step and learning_rate is None:
        raise ValueError(
            "[adafactor] relative_step=False needs a learning_rate."
        )


def _collect(grads, params, state, keys, name, out):
    """Walk the gradient tree with the parameter and state trees beside it,
    validating their structure; append (keys, name, grad, param, state) per
    gradient array, state being the parameter's state dict or None."""
    if isinstance(grads, (dict, list, tuple)) and not grads:
        # Module.trainable_parameters() maps non-array attributes to empty
        # containers; there is nothing to update under them (as in stock).
        return
    if isinstance(grads, mx.array):
        if not isinstance(params, mx.array):
            raise ValueError(
                f"[adafactor] parameter '{name or '<root>'}': the gradient is "
                f"an array where the parameters have a {type(params).__name__}."
            )
        out.append((keys, name, grads, params, state or None))
    elif isinstance(grads, dict):
        if not isinstance(params, dict):
            raise ValueError(
                f"[adafactor] parameter '{name or '<root>'}': the gradients "
                f"have a dict where the parameters have a "
                f"{type(params).__name__}."
            )
        if not isinstance(state, dict):
            state = {}
        prefix = name + "." if name else ""
        for k, g in grads.items():
            if k not in params:
                raise ValueError(
                    f"[adafactor] parameter '{prefix}{k}': there is a gradient "
                    "but no such parameter."
                )
            sub = state.get(k)
            leaf_state = isinstance(g, mx.array) and sub is not None
            if leaf_state and not isinstance(sub, dict):
                raise ValueError(
                    f"[adafactor] parameter '{prefix}{k}': the optimizer state "
                    f"holds a {type(sub).__name__} here, not the state of one "
                    "parameter."
                )
            _collect(g, params[k], sub, keys + (k,), f"{prefix}{k}", out)
    elif isinstance(grads, (list, tuple)):
        if not isinstance(params, (list, tuple)) or len(params) < len(grads):
            what = (
                f"{len(params)} entries"
                if isinstance(params, (list, tuple))
                else f"a {type(params).__name__}"
            )
            raise ValueError(
                f"[adafactor] parameter '{name or '<root>'}': the gradients "
                f"have a list of {len(grads)} where the parameters have {what}."
            )
        if not isinstance(state, (list, tuple)):
            state = ()
        prefix = name + "." if name else ""
        for i, g in enumerate(grads):
            sub = state[i] if i < len(state) else None
            _collect(g, params[i], sub, keys + (i,), f"{prefix}{i}", out)
    else:
        raise TypeError(
            f"[adafactor] gradient '{name or '<root>'}' is a "
            f"{type(grads).__name__}, expected an mlx.core.array."
        )


def _check_dtypes(p_dtype, g_dtype, leaf):
    if p_dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"[adafactor] parameter '{leaf[1]}' has dtype {p_dtype}; Adafactor "
            "updates float32, float16 and bfloat16 parameters only."
        )
    if g_dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"[adafactor] gradient '{leaf[1]}' has dtype {g_dtype}; expected "
            "float32, float16 or bfloat16."
        )


def _check_state_shapes(leaf, state):
    shapes = dict(_state_shapes(leaf[3].shape))
    if "exp_avg" in state:
        shapes["exp_avg"] = tuple(leaf[3].shape)
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"[adafactor] parameter '{leaf[1]}': state '{key}' has shape "
                f"{tuple(state[key].shape)}, expected {shape}."
            )


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
