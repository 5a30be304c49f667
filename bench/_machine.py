"""Machine facts printed with every benchmark, so figures carry their context."""

from __future__ import annotations

import os
import platform
import sys


def machine() -> dict[str, object]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "affinity": sorted(os.sched_getaffinity(0)),
    }
