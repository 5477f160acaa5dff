"""The shared helpers of the suite (afhelpers.py, reference64.py, support/)
import from every test directory."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
