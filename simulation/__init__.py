"""Some modules here may be compiled with mypyc; importing ``exchange`` first lets it drop
stale compiled modules (see ``exchange/__init__.py``) before any of them is loaded."""

import exchange  # noqa: F401
