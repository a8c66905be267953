"""Run a command; if the parent process dies first, stop the command's process group as Ctrl-C would.

Usage: python stop_with_parent.py PARENT_PID COMMAND...

`stages.tune` runs each trial (`dvc exp run`) under this, leading a process group of its own. Killed outright
(SIGKILL), tune can stop nothing; its trial would train on, unowned. So this process asks the kernel for SIGHUP
when its parent dies, and then sends its process group SIGINT: the train stage stops at the end of the epoch
under way, as on Ctrl-C. It imports nothing of the project: run it by its path, from any directory.
"""

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the thread that started it ends


def main(parent: int, command: list[str]) -> int:
    # The group's SIGINT is for the command; ignoring it with SIG_IGN would be inherited by the command.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: os.killpg(0, signal.SIGINT))
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    process = subprocess.Popen(command)
    if os.getppid() != parent:  # the parent died before prctl, or its SIGHUP came before the command started
        os.killpg(0, signal.SIGINT)
    status = process.wait()
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell reports it


if __name__ == "__main__":
    # Not sys.exit: the interpreter's teardown restores SIGINT's default action, and a second Ctrl-C (or
    # stop_all) arriving then would kill this process, its command's exit status lost (-2, not 130).
    os._exit(main(int(sys.argv[1]), sys.argv[2:]))
