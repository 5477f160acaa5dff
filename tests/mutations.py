"""Show that the CPU-path tests fail when the kernel is broken (STYLE.md).

Not collected by pytest (it builds the extension, ~30 s). Run by hand:

    /work/venv/bin/python tests/mutations.py [workdir]

It copies the checkout (git archive HEAD), plants the breakages below in
csrc/adafactor_cpu.cpp behind an AF_MUT environment variable, builds the copy
into <workdir>/site with pip --target (the shared venv is not touched), and
runs this directory's API/parity/numerics tests once per mutation with that
build first on PYTHONPATH. Every mutation must fail at least one test, and
AF_MUT=0 (the unbroken copy) none.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "test_api.py", "test_determinism.py", "test_errors.py", "test_fallback.py",
    "test_lowprec.py", "test_parity.py", "test_primitive.py", "test_training.py",
]

HEADER = (
    '#include "parallel.h"\n',
    '#include "parallel.h"\n#include <cstdlib>\n'
    'static const int kMut = std::getenv("AF_MUT") ? '
    'std::atoi(std::getenv("AF_MUT")) : 0;\n',
)

# AF_MUT value: (what breaks, [(source text, replacement), ...]).
MUTATIONS = {
    1: ("column partial sums drop the last column of every tile", [
        ("col_chunk[c] += s;", "if (kMut != 1 || c + 1 < w) col_chunk[c] += s;"),
    ]),
    2: ("row mean divides by the column count", [
        ("row_total * inv_r", "row_total * (kMut == 2 ? inv_c : inv_r)"),
    ]),
    3: ("tile partials combined in an order that depends on the thread count", [
        ("    float acc = 0.0f;\n    for (size_t k = x.item_begin;",
         "    float acc = 0.0f;\n"
         "    if (kMut == 3 && ThreadPool::instance().num_threads() > 1) {\n"
         "      for (size_t k = x.item_end; k-- > x.item_begin;) acc += v[k];\n"
         "      return acc;\n    }\n"
         "    for (size_t k = x.item_begin;"),
    ]),
    4: ("the update is rounded to the parameter dtype before the subtraction", [
        ("        store(p_out, c, adafactor_apply(load(p, c), u_of(c), mv, ts, h));",
         "        float pn = adafactor_apply(load(p, c), u_of(c), mv, ts, h);\n"
         "        if (kMut == 4) { float pin = load(p, c); P uq[1];\n"
         "          store(uq, 0, pin - pn); pn = pin - load(uq, 0); }\n"
         "        store(p_out, c, pn);"),
    ]),
    5: ("eps_1 left out of the 1-D second moment", [
        ("adafactor_ema(sq_in[e], adafactor_sq_grad(gv, h), s);",
         "adafactor_ema(sq_in[e], kMut == 5 ? gv * gv : "
         "adafactor_sq_grad(gv, h), s);"),
    ]),
    6: ("no update clipping", [
        ("x.ts.clip_scale = adafactor_clip_scale(",
         "x.ts.clip_scale = kMut == 6 ? 1.0f : adafactor_clip_scale("),
    ]),
    7: ("the folded sum(u^2) weighs T_j by cf_j, not cf_j^2", [
        ("acc += static_cast<double>(fold_sum[c]) * (cf * cf);",
         "acc += static_cast<double>(fold_sum[c]) * (kMut == 7 ? cf : cf * cf);"),
    ]),
}


def plant(source):
    old, new = HEADER
    assert old in source, "include line not found; update tests/mutations.py"
    source = source.replace(old, new, 1)
    for value, (what, edits) in MUTATIONS.items():
        for old, new in edits:
            assert old in source, f"mutation {value} ({what}): source changed"
            source = source.replace(old, new)
    return source


def main(workdir):
    work = Path(workdir)
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    cpu = src / "csrc" / "adafactor_cpu.cpp"
    cpu.write_text(plant(cpu.read_text()))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
         "--target", str(work / "site"), str(src)],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=str(work / "site"))
    failures = {}
    for value in [0, *MUTATIONS]:
        env["AF_MUT"] = str(value)
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             *[str(ROOT / "tests" / t) for t in TESTS]],
            env=env, capture_output=True, text=True,
        ).stdout
        m = re.search(r"(\d+) failed", out)
        failures[value] = int(m.group(1)) if m else 0
        what = MUTATIONS[value][0] if value else "unbroken copy"
        print(f"AF_MUT={value}: {failures[value]:4d} failing tests  ({what})")
    caught = failures[0] == 0 and all(failures[v] > 0 for v in MUTATIONS)
    print("every mutation caught" if caught else "NOT every mutation caught")
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="af-mut-")))
