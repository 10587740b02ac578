"""Tying a process's life to its parent's: Linux delivers a signal when the parent dies, even
by SIGKILL, so nothing a killed demo, test run or peer started lives on as an orphan."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def signal_on_parent_death(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Arms `sig` for this process when its parent dies; False if the parent (`parent_pid`)
    is already gone, since the signal only covers a death after it was armed. Elsewhere than
    Linux there is no such signal: nothing is armed and the answer is True."""
    if not sys.platform.startswith("linux"):
        return True
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent_pid
