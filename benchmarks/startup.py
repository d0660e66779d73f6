"""Wall time of `dp --help` and `dp inspect --help` (median of 5 runs each), for the README's record."""

import statistics
import subprocess
import sys
import time
from pathlib import Path

DP = Path(sys.executable).with_name("dp")


def median_seconds(args, runs=5):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(DP), *args], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    for args in (["--help"], ["inspect", "--help"]):
        print(f"dp {' '.join(args)}: {median_seconds(args) * 1000:.0f} ms (median of 5)")
