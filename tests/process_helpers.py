"""Helpers for tests that run a program in its own process group, as a service manager or a
terminal's Ctrl-C would signal it."""

from __future__ import annotations

import os
import subprocess


def signal_group(proc: subprocess.Popen[str], sig: int, timeout: float) -> tuple[str, str]:
    """Send ``sig`` to the whole process group of ``proc`` (started with
    ``start_new_session=True``) and return its output once it exits; a group still running
    after ``timeout`` is killed, so no test leaves a process behind."""
    try:
        os.killpg(proc.pid, sig)
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
