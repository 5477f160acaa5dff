"""Data parallel over two local processes: mlx.launch -n 2 --backend ring.

The example trainer (through example_worker.py, which records each rank)
runs on two ranks (each half of every batch, gradients
averaged with mlx.nn.average_gradients) and on one process with the whole
batch. mlx.launch exits 0 even when a rank fails, so every rank writes its
own record and the test reads them: the parameters of both ranks must be
identical after every step, and equal to the single-process run within
float32 tolerance (the all-reduce sums in another order than one batch).
In bfloat16 with stochastic rounding the ranks must stay bitwise identical
too, and drift apart when each rank gets its own seed (a planted fault).
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# The example's own setup and step, with a per-rank record of every step.
WORKER = Path(__file__).resolve().parent / "example_worker.py"
STEPS = 6
# Two half-batch gradients averaged vs one full-batch gradient: float32
# rounding of the reductions, carried through STEPS updates.
PARAM_ATOL = 1e-5
LOSS_RTOL = 1e-5
ARGS = [
    "--steps", str(STEPS), "--dims", "32", "--layers", "1", "--heads", "2",
    "--seq-len", "16", "--batch-size", "8", "--max-bytes", "200000",
    "--plot", "", "--report-every", "2",
]


def launcher():
    path = Path(sys.executable).parent / "mlx.launch"
    return str(path) if path.exists() else shutil.which("mlx.launch")


def free_port_pair(count=2):
    """A port p with p, p + 1, ... p + count - 1 free (the ring backend
    listens on one port per rank from --starting-port on)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            sockets = [socket.socket() for _ in range(count)]
            try:
                for k, sock in enumerate(sockets):
                    sock.bind(("127.0.0.1", port + k))
            finally:
                for sock in sockets:
                    sock.close()
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def read_rank(dump, rank, launch_output):
    record = dump / f"record-rank{rank}.json"
    params = dump / f"params-rank{rank}.safetensors"
    assert record.exists() and params.exists(), (
        f"rank {rank} wrote no result; launcher output:\n{launch_output}"
    )
    return json.loads(record.read_text()), mx.load(str(params))


def launch_two(tmp_path, out, args):
    """Run the worker on two ranks; return each rank's record and parameters."""
    launch = subprocess.run(
        [launcher(), "-n", "2", "--backend", "ring",
         "--starting-port", str(free_port_pair()),
         sys.executable, str(WORKER), str(tmp_path / out), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    output = launch.stdout + launch.stderr
    return [read_rank(tmp_path / out, r, output) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["compiled", "eager"])
def test_two_ranks_match_single_process(tmp_path, mode):
    extra = ["--no-compile"] if mode == "eager" else []
    (rec0, params0), (rec1, params1) = launch_two(tmp_path, "two", [*ARGS, *extra])
    single = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "one"), *ARGS, *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    one, params_one = read_rank(tmp_path / "one", 0, single.stdout + single.stderr)
    assert (rec0["rank"], rec0["size"]) == (0, 2)
    assert (rec1["rank"], rec1["size"]) == (1, 2)
    assert one["size"] == 1

    # Identical on both ranks after every step.
    assert len(rec0["digests"]) == len(rec1["digests"]) == STEPS
    assert rec0["digests"] == rec1["digests"]
    assert rec0["losses"] == rec1["losses"]
    for k in params0:
        np.testing.assert_array_equal(np.array(params0[k]), np.array(params1[k]), k)

    # The same training as one process on the whole batch.
    np.testing.assert_allclose(rec0["losses"], one["losses"], rtol=LOSS_RTOL)
    assert params0.keys() == params_one.keys()
    for k in params_one:
        np.testing.assert_allclose(
            np.array(params0[k]), np.array(params_one[k]), rtol=0,
            atol=PARAM_ATOL, err_msg=k,
        )


def test_stochastic_rounding_keeps_ranks_identical(tmp_path):
    """bfloat16 with stochastic rounding at a fixed learning rate: the
    random bits are a function of (seed, parameter path, step, element),
    the same on every rank, so the ranks stay bitwise identical after every
    step. With a rank-dependent seed (a planted fault) they drift apart from
    the first step, which also shows the rounding was stochastic."""
    args = [*ARGS, "--dtype", "bfloat16", "--stochastic-rounding",
            "--learning-rate", "1e-3"]
    (rec0, params0), (rec1, params1) = launch_two(tmp_path, "same", args)
    assert (rec0["size"], rec1["size"]) == (2, 2)
    assert rec0["stochastic_rounding"] and rec1["stochastic_rounding"]
    assert len(rec0["digests"]) == STEPS
    assert rec0["digests"] == rec1["digests"]
    assert rec0["losses"] == rec1["losses"]
    assert params0.keys() == params1.keys()
    for k in params0:
        assert params0[k].dtype == mx.bfloat16, k
        assert mx.array_equal(params0[k], params1[k]).item(), k

    (bad0, _), (bad1, _) = launch_two(
        tmp_path, "planted", [*args, "--planted-rank-seed"]
    )
    assert (bad0["seed"], bad1["seed"]) == (0, 1)
    # Rank 0 keeps seed 0: its first step is the one above (later steps
    # average gradients with the drifted rank 1).
    assert bad0["digests"][0] == rec0["digests"][0]
    assert all(a != b for a, b in zip(bad0["digests"], bad1["digests"]))
