"""Runs a command and prints, as JSON, its wall-clock seconds and the peak
of the resident memory summed over the command and every process it starts
(HF datasets' num_proc workers are processes; GNU time would miss them),
sampled every 50 ms from /proc.

Usage: peak_rss.py COMMAND [ARGS...]
"""

import json
import os
import subprocess
import sys
import time


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and its descendants."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def main() -> None:
    started = time.monotonic()
    process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.05)
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "status": process.returncode}))
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
