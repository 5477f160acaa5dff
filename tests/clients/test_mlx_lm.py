"""The opt-in patch against mlx-lm's own trainer.

mlx-lm's ``lora`` entry point looks ``optim.Adafactor`` up when it builds the
optimizer, and its trainer compiles the step over ``[model.state,
optimizer.state, mx.random.state]``, so under the patch the fused class runs
its lazy primitive inside ``mx.compile``. A tiny randomly initialised Llama
trained on synthetic token sequences must give the loss curve of stock
Adafactor in float32.
"""

import itertools
import types

import mlx.core as mx
import mlx.optimizers
import mlx.optimizers.optimizers
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lm import lora
from mlx_lm.models import llama
from mlx_lm.tuner import trainer
from mlx_lm.tuner.callbacks import TrainingCallback

import mlx_fused_adafactor
from mlx_fused_adafactor import Adafactor, patch_mlx, unpatch_mlx
from mlx_fused_adafactor.patch import STOCK_ADAFACTOR

VOCAB = 64
ITERS = 40
# Float32 throughout. The fused step computes stock's float32 math but not in
# the same operation order, so the runs agree to rounding that accumulates
# over the iterations (measured: 4e-7 relative on the loss, 7e-7 absolute on
# the parameters after 40 iterations).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


class Sequences:
    """Synthetic arithmetic sequences modulo VOCAB, in the item format of
    mlx-lm's datasets (``process`` returns ``(tokens, prompt_offset)``)."""

    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self._data = []
        for _ in range(n):
            length = int(rng.integers(16, 31))
            start, stride = int(rng.integers(VOCAB)), int(rng.integers(1, 4))
            self._data.append([(start + stride * i) % VOCAB for i in range(length)])

    def process(self, tokens):
        return (tokens, 0)

    def __getitem__(self, idx):
        return self._data[idx]

    def __len__(self):
        return len(self._data)


class LossLog(TrainingCallback):
    def __init__(self):
        self.losses = []

    def on_train_loss_report(self, info):
        self.losses.append(info["train_loss"])


def tiny_llama():
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(autouse=True)
def _stock_after():
    yield
    unpatch_mlx()


def test_patch_and_undo():
    assert mlx.optimizers.Adafactor is STOCK_ADAFACTOR
    handle = patch_mlx()
    assert mlx_fused_adafactor.is_patched()
    assert mlx.optimizers.Adafactor is Adafactor
    assert mlx.optimizers.optimizers.Adafactor is Adafactor
    handle.undo()
    assert mlx.optimizers.Adafactor is STOCK_ADAFACTOR
    assert mlx.optimizers.optimizers.Adafactor is STOCK_ADAFACTOR
    handle.undo()
    assert mlx.optimizers.Adafactor is STOCK_ADAFACTOR

    with patch_mlx() as outer:
        with patch_mlx():
            assert mlx.optimizers.Adafactor is Adafactor
        assert mlx.optimizers.Adafactor is Adafactor
        assert outer.active
    assert not outer.active
    assert mlx.optimizers.Adafactor is STOCK_ADAFACTOR

    patch_mlx()
    patch_mlx()
    unpatch_mlx()
    assert mlx.optimizers.Adafactor is STOCK_ADAFACTOR
    assert not mlx_fused_adafactor.is_patched()


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_patch_handles_undone_in_any_order(order):
    # NOTE: [patch handles]: the patch stays while any handle is active, a
    # handle reports undone only once undone, and the last undo, whichever
    # it is, restores stock.
    handles = [patch_mlx() for _ in range(3)]
    for n, i in enumerate(order):
        handles[i].undo()
        handles[i].undo()
        assert not handles[i].active and "undone" in repr(handles[i])
        active = [h for h in handles if h.active]
        assert len(active) == 2 - n
        assert all("active" in repr(h) for h in active)
        assert mlx_fused_adafactor.is_patched() == bool(active)
        assert mlx.optimizers.optimizers.Adafactor is (Adafactor if active else STOCK_ADAFACTOR)
    assert mlx.optimizers.Adafactor is STOCK_ADAFACTOR
    # unpatch_mlx undoes every handle; a later undo changes nothing.
    first = patch_mlx()
    unpatch_mlx()
    assert not first.active
    second = patch_mlx()
    first.undo()
    assert mlx_fused_adafactor.is_patched() and second.active
    second.undo()
    assert not mlx_fused_adafactor.is_patched()


def train_with_trainer(make_optimizer, tmp_path):
    """Train the tiny Llama with mlx_lm.tuner.trainer.train; return the
    per-iteration losses and the final parameters."""
    model = tiny_llama()
    optimizer = make_optimizer()
    log = LossLog()
    np.random.seed(0)
    trainer.train(
        model=model,
        optimizer=optimizer,
        train_dataset=lora.CacheDataset(Sequences(32, seed=1)),
        args=trainer.TrainingArgs(
            batch_size=4,
            iters=ITERS,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=64,
            adapter_file=str(tmp_path / "adapters.safetensors"),
        ),
        training_callback=log,
    )
    return optimizer, log.losses, dict(tree_flatten(model.parameters()))


def test_trainer_loss_curve_matches_stock(tmp_path):
    def make():
        return mlx.optimizers.Adafactor(learning_rate=1e-2, relative_step=False)

    stock_opt, stock_losses, stock_params = train_with_trainer(make, tmp_path)
    with patch_mlx():
        fused_opt, fused_losses, fused_params = train_with_trainer(make, tmp_path)
    assert type(stock_opt) is STOCK_ADAFACTOR
    assert type(fused_opt) is Adafactor

    assert len(stock_losses) == len(fused_losses) == ITERS
    assert fused_losses[-1] < 0.8 * fused_losses[0], "the model did not train"
    np.testing.assert_allclose(fused_losses, stock_losses, rtol=LOSS_RTOL)
    assert fused_params.keys() == stock_params.keys()
    for name in stock_params:
        np.testing.assert_allclose(
            np.array(fused_params[name]),
            np.array(stock_params[name]),
            rtol=0,
            atol=PARAM_ATOL,
            err_msg=name,
        )
    assert int(fused_opt.state["step"]) == int(stock_opt.state["step"]) == ITERS


def lora_args(tmp_path):
    return types.SimpleNamespace(
        model="tiny-random-llama",
        data="synthetic",
        seed=0,
        num_layers=2,
        fine_tune_type="full",
        resume_adapter_file=None,
        adapter_path=str(tmp_path / "adapters"),
        batch_size=4,
        iters=ITERS // 2,
        val_batches=1,
        steps_per_report=1,
        steps_per_eval=10**9,
        save_every=10**9,
        max_seq_length=64,
        grad_checkpoint=False,
        grad_accumulation_steps=1,
        lr_schedule=None,
        learning_rate=1e-2,
        optimizer="adafactor",
        optimizer_config={"adafactor": {"relative_step": False}},
        lora_parameters=None,
    )


def test_lora_entry_point_picks_up_patch(tmp_path, monkeypatch):
    """mlx_lm.lora.train_model builds ``optim.Adafactor`` at call time."""
    seen = []
    real_train = lora.train

    def spy(*, optimizer, **kwargs):
        seen.append(type(optimizer))
        return real_train(optimizer=optimizer, **kwargs)

    monkeypatch.setattr(lora, "train", spy)
    curves = []
    for patched in (False, True):
        log = LossLog()
        np.random.seed(0)
        handle = patch_mlx() if patched else None
        try:
            lora.train_model(
                lora_args(tmp_path / str(patched)),
                tiny_llama(),
                Sequences(32, seed=1),
                Sequences(8, seed=2),
                training_callback=log,
            )
        finally:
            if handle is not None:
                handle.undo()
        curves.append(log.losses)
    assert seen == [STOCK_ADAFACTOR, Adafactor]
    assert len(curves[1]) == ITERS // 2
    np.testing.assert_allclose(curves[1], curves[0], rtol=LOSS_RTOL)
