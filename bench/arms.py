"""The contenders: one optimizer step each, taken the way a user would.

Every arm is prepared on a parameter and gradient tree, then ``step()`` runs
one whole optimizer step and returns once the new parameters and state are
computed (``mx.eval`` for MLX; PyTorch on the CPU is synchronous).
``steps_done()`` reads the optimizer's own step counter, so the benchmark can
check that every timed call really updated the state. ``fused-sr`` is
``fused`` with ``stochastic_rounding=True``, run for bfloat16 and float16
only (in float32 it is the same step).
"""

import mlx.core as mx
import mlx.optimizers
import numpy as np
from mlx.utils import tree_flatten

import mlx_fused_adafactor

MLX_ARMS = ("mlx-stock", "mlx-stock-compiled", "fused", "fused-compiled", "fused-sr")
TORCH_ARMS = ("torch-loop", "torch-foreach")
ALL_ARMS = MLX_ARMS + TORCH_ARMS
# Arms that differ from another only in 16-bit storage; not run in float32.
LOW_PRECISION_ARMS = ("fused-sr",)

# torch.optim.Adafactor with the settings closest to MLX's defaults:
# lr=1e-2 is MLX's relative-step cap min(1e-2, 1/sqrt(t)); beta2_decay is
# MLX's decay_rate; d is clip_threshold; eps[1] is MLX's eps[1] (the
# parameter-scale floor). eps[0] differs in kind: MLX adds 1e-30 to g^2,
# PyTorch clamps the variance estimate at eps[0]^2 (None = the dtype's
# machine epsilon). PyTorch keeps its state in the parameter dtype and has
# no momentum option; MLX's beta_1 stays None.
TORCH_SETTINGS = dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                      weight_decay=0.0)


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class MlxArm:
    """An MLX optimizer class, eager or with the step under ``mx.compile``
    (state passed as the compiled function's implicit inputs and outputs),
    constructed with ``options``."""

    def __init__(self, name, optimizer_class, compiled, **options):
        self.name = name
        self.optimizer_class = optimizer_class
        self.compiled = compiled
        self.options = options

    def prepare(self, params, grads):
        self.opt = self.optimizer_class(**self.options)
        self.opt.init(params)
        mx.eval(self.opt.state)
        self.params, self.grads = params, grads
        opt = self.opt

        def apply(g, p):
            return opt.apply_gradients(g, p)

        if self.compiled:
            apply = mx.compile(apply, inputs=opt.state, outputs=opt.state)
        self.apply = apply

    def step(self):
        self.params = self.apply(self.grads, self.params)
        mx.eval(self.params, self.opt.state)

    def steps_done(self):
        return int(self.opt.state["step"].item())

    def close(self):
        self.opt = self.apply = self.params = self.grads = None


class TorchArm:
    """``torch.optim.Adafactor`` on the CPU, for-loop or foreach."""

    def __init__(self, name, foreach):
        self.name = name
        self.foreach = foreach

    def prepare(self, params, grads):
        import torch

        tensors = []
        for (_, p), (_, g) in zip(tree_flatten(params), tree_flatten(grads)):
            t = _to_torch(p)
            t.grad = _to_torch(g)
            tensors.append(t)
        self.tensors = tensors
        self.opt = torch.optim.Adafactor(tensors, foreach=self.foreach,
                                         **TORCH_SETTINGS)

    def step(self):
        self.opt.step()

    def steps_done(self):
        return int(self.opt.state[self.tensors[0]]["step"].item())

    def close(self):
        self.opt = self.tensors = None


def _to_torch(a):
    import torch

    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def make(name):
    if name == "mlx-stock":
        return MlxArm(name, mlx.optimizers.Adafactor, compiled=False)
    if name == "mlx-stock-compiled":
        return MlxArm(name, mlx.optimizers.Adafactor, compiled=True)
    if name == "fused":
        return MlxArm(name, mlx_fused_adafactor.Adafactor, compiled=False)
    if name == "fused-compiled":
        return MlxArm(name, mlx_fused_adafactor.Adafactor, compiled=True)
    if name == "fused-sr":
        return MlxArm(name, mlx_fused_adafactor.Adafactor, compiled=False,
                      stochastic_rounding=True)
    if name == "torch-loop":
        return TorchArm(name, foreach=False)
    if name == "torch-foreach":
        return TorchArm(name, foreach=True)
    raise SystemExit(f"bench: unknown arm '{name}' (choose from {', '.join(ALL_ARMS)})")
