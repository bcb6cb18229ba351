"""Run a command and measure its own peak resident memory, not its parent's.

Linux keeps a process's ``ru_maxrss`` across ``execve``: a child that Python starts with
vfork or fork and then exec begins with the parent's high-water mark. A test process that
has grown to 1.4 GB therefore sees every child it starts "peak" at 1.4 GB or more, however
little the child itself uses. So the command is started by a bare launcher (``python -S``,
about 10 MB), whose own small high-water mark is all the command can inherit, and the
launcher passes on the command's ``wait4`` accounting.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

# Runs in the launcher: starts argv[2:], kills it after argv[1] seconds, prints its rusage.
_LAUNCHER = """
import json, os, subprocess, sys, time
deadline = time.monotonic() + float(sys.argv[1])
child = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
timed_out = False
while True:
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid:
        break
    if time.monotonic() > deadline:
        child.kill()
        _, status, usage = os.wait4(child.pid, 0)
        timed_out = True
        break
    time.sleep(0.05)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                  "timed_out": timed_out}))
"""


def run_measured(cmd: list[str], stderr, timeout: float = 3600) -> tuple[int, int, float, bool]:
    """Run `cmd` (stdout discarded, stderr to the open file `stderr`): its exit code, its
    own peak RSS in bytes, wall seconds, and whether it was killed at `timeout`."""
    start = time.perf_counter()
    launcher = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(timeout), *cmd],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, check=True)
    seconds = time.perf_counter() - start
    result = json.loads(launcher.stdout)
    return result["code"], result["maxrss_kib"] * 1024, seconds, result["timed_out"]
