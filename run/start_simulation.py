#!/usr/bin/env python3
"""Run a market simulation: `python run/start_simulation.py --help` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
