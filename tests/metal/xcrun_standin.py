"""A stand-in for `xcrun -sdk macosx metal` on Linux, for the build tests.

$XCRUN_STANDIN chooses the machine it plays:
  ok (default)  a Metal compiler: compiling (`-c SRC -o OUT.air`) runs the
                Metal lint (emu.build.lint) on SRC with the -I directories
                given and writes a placeholder AIR file naming SRC, plus the
                depfile asked for with -MF; linking (`*.air -o LIB.metallib`)
                writes a placeholder library listing the sources of its AIR
                files.
  clt           the Command Line Tools alone, which have no Metal compiler.
  toolchain     Xcode 26 before `xcodebuild -downloadComponent
                MetalToolchain`.
The failures print what xcrun prints there and exit with its status.
"""

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from emu import build  # noqa: E402

FAILURES = {
    "clt": 'xcrun: error: unable to find utility "metal", not a developer '
           "tool or in PATH",
    "toolchain": "error: error: cannot execute tool 'metal' due to missing "
                 "Metal Toolchain; use: xcodebuild -downloadComponent "
                 "MetalToolchain",
}


def main(argv):
    mode = os.environ.get("XCRUN_STANDIN", "ok")
    args = list(argv)
    if args[:2] == ["-sdk", "macosx"]:
        args = args[2:]
    if not args or args[0] != "metal":
        print(f"xcrun stand-in: unsupported command {argv}", file=sys.stderr)
        return 2
    if mode in FAILURES:
        print(FAILURES[mode], file=sys.stderr)
        return 72
    args = args[1:]
    if "--help" in args:
        print("OVERVIEW: stand-in metal compiler")
        return 0
    out = Path(args[args.index("-o") + 1])
    if "-c" in args:
        src = Path(args[args.index("-c") + 1])
        incs = [a[2:] for a in args if a.startswith("-I")]
        proc = build.lint(src, include_dirs=incs)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return 1
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        out.write_text(f"placeholder AIR of {src} {digest}\n")
        if "-MF" in args:
            dep = Path(args[args.index("-MF") + 1])
            dep.write_text(f"{out}: {src}\n")
        return 0
    airs = [Path(a) for a in args if a.endswith(".air")]
    # Each compiled source as "path sha256".
    sources = [a.read_text().split(" of ", 1)[1].strip() for a in airs]
    out.write_text("placeholder metallib\n" + "\n".join(sources) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
