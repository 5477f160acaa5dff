"""One process of the example trainer, recorded for tests/clients: the
example's own setup and training step (train_lm.setup, Run.train_step),
with each rank's loss and a digest of its parameters after every step, and
its final parameters, written to OUT/record-rank<r>.json and
OUT/params-rank<r>.safetensors.

    python tests/clients/example_worker.py OUT [--planted-rank-seed] [train_lm arguments...]

--planted-rank-seed plants a fault: each rank's optimizer gets its rank as
the seed of its stochastic rounding, as if the random state were per rank.
"""

import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_fused_adafactor.examples import train_lm


def digest(model):
    h = hashlib.sha256()
    for key, value in tree_flatten(model.parameters()):
        h.update(key.encode())
        h.update(np.array(value.astype(mx.float32)).tobytes())
    return h.hexdigest()


def main(out, argv):
    planted_rank_seed = "--planted-rank-seed" in argv
    argv = [a for a in argv if a != "--planted-rank-seed"]
    args = train_lm.parse_args(argv)
    world = mx.distributed.init()
    runs, data, first_step = train_lm.setup(args, world)
    run = runs[0]
    if planted_rank_seed:
        run.optimizer.seed = world.rank()
    record = {
        "rank": world.rank(), "size": world.size(), "losses": [], "digests": [],
        "stochastic_rounding": run.optimizer.stochastic_rounding,
        "seed": run.optimizer.seed,
    }
    for step in range(first_step, first_step + args.steps):
        run.train_step(*data.get(step))
        record["losses"].append(run.losses[-1])
        record["digests"].append(digest(run.model))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = world.rank()
    mx.save_safetensors(str(out / f"params-rank{rank}.safetensors"),
                        dict(tree_flatten(run.model.parameters())))
    (out / f"record-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
