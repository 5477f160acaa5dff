"""The drop-in Adafactor class.

Thin by design: it validates, lays out the state exactly as
``mlx.optimizers.Adafactor`` does, and hands every parameter of a dtype group
to one fused primitive per step. The math lives in kernels/adafactor_math.h.
"""

import math
import warnings
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
from mlx.optimizers import Optimizer

from ._build import ext as _ext
from .reference import adafactor_reference

_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_FACTORED_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col")
_FLAT_KEYS = ("exp_avg_sq",)

_fallback_warned = False


def _path(keys):
    return ".".join(str(k) for k in keys) if keys else "<root>"


def _state_shapes(shape):
    if len(shape) >= 2:
        return {
            "exp_avg_sq_row": tuple(shape[:-1]),
            "exp_avg_sq_col": tuple(shape[:-2]) + tuple(shape[-1:]),
        }
    return {"exp_avg_sq": tuple(shape)}


class _Leaf:
    """One parameter of the step: where it is and what goes in."""

    __slots__ = ("keys", "name", "grad", "param", "state")

    def __init__(self, keys, grad, param, state):
        self.keys = keys
        self.name = _path(keys)
        self.grad = grad
        self.param = param
        self.state = state


class Adafactor(Optimizer):
    r"""The Adafactor optimizer, fused.

    A drop-in replacement for :class:`mlx.optimizers.Adafactor` with the same
    constructor, the same state tree, and the same results in float32. Each
    step runs as one fused primitive per dtype group; all arithmetic is
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
        _collect(gradients, parameters, self._state, (), leaves)
        for leaf in leaves:
            self._check_leaf(leaf)
        learning_rate = self._check_learning_rate()

        # Nothing has changed so far; from here on nothing can fail on input.
        if not self._initialized or any(not leaf.state for leaf in leaves):
            self.init(gradients)
            for leaf in leaves:
                leaf.state = _lookup(self._state, leaf.keys)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        if "learning_rate" in self._schedulers:
            learning_rate = self.state["learning_rate"]
        step = self.step + 1
        self.state["step"] = step

        new_params = self._step(step, learning_rate, leaves)
        return _rebuild(gradients, (), new_params)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        """Update one parameter with the current step count; ``state`` is
        updated in place. Provided for code that drives optimizers per
        parameter; :meth:`apply_gradients` fuses all parameters instead."""
        leaf = _Leaf(("<single>",), gradient, parameter, state)
        self._check_leaf(leaf)
        if not state:
            self.init_single(parameter, state)
        learning_rate = self._check_learning_rate()
        return self._step(self.step, learning_rate, [leaf])[leaf.keys]

    def _check_learning_rate(self):
        if self.relative_step:
            return mx.array(0.0, mx.float32)
        if "learning_rate" not in self._state:
            raise ValueError(
                "[adafactor] relative_step=False needs a learning rate, and "
                "the state has none."
            )
        return mx.array(self._state["learning_rate"])

    def _check_leaf(self, leaf):
        g, p, name = leaf.grad, leaf.param, leaf.name
        if not isinstance(g, mx.array):
            raise TypeError(
                f"[adafactor] gradient '{name}' is a {type(g).__name__}, "
                "expected an mlx.core.array."
            )
        if not isinstance(p, mx.array):
            raise ValueError(
                f"[adafactor] parameter '{name}': the gradient tree has an "
                f"array where the parameters have a {type(p).__name__}."
            )
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"[adafactor] parameter '{name}' has dtype {p.dtype}; Adafactor "
                "updates float32, float16 and bfloat16 parameters only."
            )
        if g.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"[adafactor] gradient '{name}' has dtype {g.dtype}; expected "
                "float32, float16 or bfloat16."
            )
        if g.shape != p.shape:
            raise ValueError(
                f"[adafactor] parameter '{name}': gradient shape {g.shape} "
                f"does not match parameter shape {p.shape}."
            )
        state = leaf.state
        if not state:
            return
        expected = dict(_state_shapes(p.shape))
        if self.beta_1 is not None:
            expected["exp_avg"] = tuple(p.shape)
        for key, shape in expected.items():
            if key not in state:
                raise ValueError(
                    f"[adafactor] parameter '{name}': state has no '{key}' "
                    f"(it has {sorted(state)}); the state does not fit this "
                    "parameter or these optimizer options."
                )
            arr = state[key]
            if not isinstance(arr, mx.array) or tuple(arr.shape) != shape:
                got = getattr(arr, "shape", type(arr).__name__)
                raise ValueError(
                    f"[adafactor] parameter '{name}': state '{key}' has shape "
                    f"{got}, expected {shape}."
                )
            if arr.dtype not in _FLOAT_DTYPES:
                raise ValueError(
                    f"[adafactor] parameter '{name}': state '{key}' has dtype "
                    f"{arr.dtype}, expected a float dtype."
                )

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

    def _step(self, step, learning_rate, leaves):
        """Run the step on validated leaves; write their state, return the
        new parameters by key path."""
        momentum = self.beta_1 is not None
        keys = _FACTORED_KEYS, _FLAT_KEYS
        device = mx.default_device()
        if device != mx.cpu and not _ext.has_metal_kernels:
            return self._fallback_step(step, learning_rate, leaves)

        groups = {}
        for leaf in leaves:
            groups.setdefault((leaf.param.dtype, leaf.grad.dtype), []).append(leaf)
        flags = self._flags()
        beta_1 = 0.0 if self.beta_1 is None else float(self.beta_1)
        new_params = {}
        staged = []
        for (dtype, _), group in groups.items():
            states = []
            for leaf in group:
                st = leaf.state
                names = keys[0] if leaf.param.ndim >= 2 else keys[1]
                arrays = [_as(st[k], mx.float32) for k in names]
                if momentum:
                    arrays.append(_as(st["exp_avg"], dtype))
                states.append(arrays)
            outs = _ext.adafactor_step(
                step,
                learning_rate,
                [leaf.param for leaf in group],
                [leaf.grad for leaf in group],
                states,
                [leaf.name for leaf in group],
                self.eps[0],
                self.eps[1],
                self.clip_threshold,
                self.decay_rate,
                beta_1,
                1.0 - beta_1,
                self.weight_decay,
                flags,
            )
            i = 0
            for leaf in group:
                names = keys[0] if leaf.param.ndim >= 2 else keys[1]
                new_params[leaf.keys] = outs[i]
                i += 1
                new_state = dict(zip(names, outs[i : i + len(names)]))
                i += len(names)
                if momentum:
                    new_state["exp_avg"] = outs[i]
                    i += 1
                staged.append((leaf.state, new_state))
        for state, new_state in staged:
            state.update(new_state)
        return new_params

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

    def _fallback_step(self, step, learning_rate, leaves):
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
        new_params = {}
        staged = []
        for leaf in leaves:
            p, st = fn(step, learning_rate, leaf.param, leaf.grad, dict(leaf.state))
            new_params[leaf.keys] = p
            staged.append((leaf.state, st))
        for state, new_state in staged:
            state.update(new_state)
        return new_params


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


def _as(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


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


def _collect(grads, params, state, keys, out):
    """Walk the gradient tree with the parameter and state trees beside it,
    validating their structure, and append a _Leaf per gradient array."""
    if isinstance(grads, dict):
        if not isinstance(params, dict):
            raise ValueError(
                f"[adafactor] parameter '{_path(keys)}': the gradients have a "
                f"dict where the parameters have a {type(params).__name__}."
            )
        for k, g in grads.items():
            if k not in params:
                raise ValueError(
                    f"[adafactor] parameter '{_path(keys + (k,))}': there is a "
                    "gradient but no such parameter."
                )
            sub = state.get(k) if isinstance(state, dict) else None
            _collect(g, params[k], sub, keys + (k,), out)
    elif isinstance(grads, (list, tuple)):
        if not isinstance(params, (list, tuple)) or len(params) < len(grads):
            raise ValueError(
                f"[adafactor] parameter '{_path(keys)}': the gradients have a "
                f"list of {len(grads)} where the parameters have "
                f"{len(params) if isinstance(params, (list, tuple)) else type(params).__name__}."
            )
        for i, g in enumerate(grads):
            sub = (
                state[i]
                if isinstance(state, (list, tuple)) and i < len(state)
                else None
            )
            _collect(g, params[i], sub, keys + (i,), out)
    else:
        if isinstance(state, dict) and any(
            isinstance(v, (dict, list, tuple)) for v in state.values()
        ):
            raise ValueError(
                f"[adafactor] parameter '{_path(keys)}': the optimizer state "
                "holds a subtree here, not the state of one parameter."
            )
        out.append(_Leaf(keys, grads, params, state if isinstance(state, dict) else None))


def _lookup(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _rebuild(grads, keys, new_params):
    if isinstance(grads, dict):
        return {k: _rebuild(v, keys + (k,), new_params) for k, v in grads.items()}
    if isinstance(grads, (list, tuple)):
        return type(grads)(
            _rebuild(v, keys + (i,), new_params) for i, v in enumerate(grads)
        )
    return new_params[keys]
