#!/usr/bin/env python3
"""Trade from a terminal: `python run/start_client.py --user Alice` (`--help` lists the options)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.tui import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
