"""Run a command and write its wall time, CPU time and peak RSS as JSON: ``_peak_rss.py OUT.json CMD...``.

Linux keeps a process's peak RSS across fork and exec, so a tool started straight from the bench
(which holds the full-precision model) would report at least the bench's own memory. This small
process (no torch) starts the tool instead: the tool's peak RSS is then its own.
"""

import json
import os
import subprocess
import sys
import time

if __name__ == "__main__":
    t0 = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:])
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(sys.argv[1], "w") as f:
        json.dump({"returncode": code, "wall_seconds": time.perf_counter() - t0,
                   "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_seconds": usage.ru_utime + usage.ru_stime}, f)
    sys.exit(code)
