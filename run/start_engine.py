#!/usr/bin/env python3
"""Run the exchange: `python run/start_engine.py --help` lists the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exchange.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
