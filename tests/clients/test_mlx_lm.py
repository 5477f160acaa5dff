"""The opt-in patch against mlx-lm's own trainer.

mlx-lm's ``lora`` entry point looks ``optim.Adafactor`` up when it builds the
optimizer, and its trainer compiles the step over ``[model.state,
optimizer.state, mx.random.state]``, so under the patch the fused class runs
its lazy primitive inside ``mx.compile``. A tiny randomly initialised Llama
trained on synthetic token sequences must give the loss curve of stock
Adafactor in float32.

``python -m mlx_fused_adafactor.lora`` runs mlx-lm's own command line with
the fused class: a full fine-tune of the tiny Llama in bfloat16, written to
a directory with a tokenizer built here, through mlx_lm.lora.main.
"""

import itertools
import json
import subprocess
import sys
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


# The tiny Llama's config.json.
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
}


def tiny_llama():
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**TINY_LLAMA))
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


# ------------------------------------------- python -m mlx_fused_adafactor.lora

# Words of the local tokenizer, after its special tokens: VOCAB ids in all.
SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def write_model_dir(path):
    """The tiny Llama in bfloat16 as mlx-lm loads a model from a directory
    (config.json, model.safetensors), with a word-level tokenizer built here
    (tokenizer.json, tokenizer_config.json): nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True)
    model = tiny_llama()
    model.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(path / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    ).save_pretrained(str(path))
    return path


def write_data_dir(path):
    """train.jsonl and valid.jsonl of {"text": ...}: arithmetic sequences of
    the tokenizer's words."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 32), ("valid", 8)):
        lines = []
        for _ in range(n):
            start, stride = int(rng.integers(len(WORDS))), int(rng.integers(1, 4))
            length = int(rng.integers(16, 31))
            text = " ".join(WORDS[(start + stride * i) % len(WORDS)] for i in range(length))
            lines.append(json.dumps({"text": text}) + "\n")
        (path / f"{name}.jsonl").write_text("".join(lines))
    return path


def lora_cli_args(tmp_path, iters):
    """mlx_lm.lora's command line for a full fine-tune of the tiny Llama,
    with Adafactor from a YAML config: a fixed learning rate (from the
    command line), stochastic rounding and a seed."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "optimizer: adafactor\n"
        "optimizer_config:\n"
        "  adafactor:\n"
        "    relative_step: false\n"
        "    stochastic_rounding: true\n"
        "    seed: 7\n"
    )
    return [
        "--model", str(write_model_dir(tmp_path / "model")),
        "--data", str(write_data_dir(tmp_path / "data")),
        "--train", "--fine-tune-type", "full", "--num-layers", "2",
        "--batch-size", "4", "--iters", str(iters), "--steps-per-report", "1",
        "--steps-per-eval", "1000", "--val-batches", "1",
        "--learning-rate", "1e-3", "--adapter-path", str(tmp_path / "adapters"),
        "-c", str(config),
    ]


def trained_weights(tmp_path):
    """The trained weights mlx-lm saved, and the initial ones of the same
    names."""
    trained = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    initial = mx.load(str(tmp_path / "model" / "model.safetensors"))
    return trained, {k: initial[k] for k in trained}


def test_lora_cli_trains_with_the_fused_class(tmp_path, monkeypatch):
    """mlx_fused_adafactor.lora.main runs mlx-lm's own entry point
    (mlx_lm.lora.main, which parses the command line and the YAML config,
    loads the model and data and builds the optimizer); a spy on the
    trainer sees the optimizer and the losses."""
    from mlx_fused_adafactor import lora as fused_lora

    seen = []
    real_train = lora.train

    def spy(*, optimizer, training_callback, **kwargs):
        log = LossLog()
        seen.append((optimizer, log))
        return real_train(optimizer=optimizer, training_callback=log, **kwargs)

    monkeypatch.setattr(lora, "train", spy)
    # mlx-lm's main sets it; restored after the test.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    argv = lora_cli_args(tmp_path, iters=4)
    fused_lora.main(argv)
    assert not mlx_fused_adafactor.is_patched()

    [(optimizer, log)] = seen
    assert type(optimizer) is Adafactor
    assert optimizer.stochastic_rounding and optimizer.seed == 7
    assert not optimizer.relative_step
    assert optimizer.learning_rate.item() == np.float32(1e-3)
    assert int(optimizer.state["step"]) == 4
    assert len(log.losses) == 4 and np.isfinite(log.losses).all(), log.losses

    trained, initial = trained_weights(tmp_path)
    assert trained and all(v.dtype == mx.bfloat16 for v in trained.values())
    assert all(mx.isfinite(v).all().item() for v in trained.values())
    assert any(not mx.array_equal(trained[k], initial[k]).item() for k in trained)

    # The same command line through mlx-lm's entry point without the fused
    # class: stock Adafactor has no stochastic_rounding.
    monkeypatch.setattr(sys, "argv", ["mlx_lm.lora", *argv])
    with pytest.raises(TypeError, match="stochastic_rounding"):
        lora.main()


def test_python_m_lora(tmp_path):
    """The one-line command, in a process of its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_fused_adafactor.lora",
         *lora_cli_args(tmp_path, iters=2)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trained, initial = trained_weights(tmp_path)
    assert all(mx.isfinite(v).all().item() for v in trained.values())
    assert any(not mx.array_equal(trained[k], initial[k]).item() for k in trained)


def test_lora_cli_without_mlx_lm(tmp_path):
    """Without mlx-lm the command says what is missing."""
    code = (
        "import sys; sys.modules['mlx_lm'] = None\n"
        "from mlx_fused_adafactor import lora; lora.main(['--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "[adafactor] python -m mlx_fused_adafactor.lora runs mlx-lm's" in proc.stderr
    assert "pip install mlx-lm" in proc.stderr
