"""The sweep driver's peak RSS for one trial printing a lot to stdout vs one printing a little.

    python -m bench.stdout_rss [--mb 1024]

Each side runs `python -m pipeline.sweep` (its own process, its own local Ray) on a sweep of one trial whose
program prints N bytes of short lines, then its metric; the driver reports its peak RSS (ru_maxrss) at exit.
Goal: the big trial's driver within 50 MB of the small one's (a trial's stdout is read on the node).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRINTER = r"""
import sys
n = int(sys.argv[1])
line = b"x" * 99 + b"\n"
block = line * 10486
out = sys.stdout.buffer
while n >= len(block):
    out.write(block)
    n -= len(block)
out.write(line[:n])
out.write(b"\n0.5\n")
"""

SWEEP = """
program = "printer.py"
args = "{n}"
[params]
n = [NBYTES]
[resources]
cpus = 1
"""

#: runs the sweep command in this process and prints its peak RSS (KiB) to stderr at the end
DRIVER = (
    "import resource, sys; from pipeline.sweep_cli import main; rc = main(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def driver_peak_rss_mb(nbytes: int, local_cpus: int = 1, timeout: float = 900) -> float:
    """Run a one-trial sweep whose program prints `nbytes` to stdout; the driver's peak RSS in MB."""
    with tempfile.TemporaryDirectory(prefix="stdout-rss-") as d:
        tmp = Path(d)
        (tmp / "printer.py").write_text(PRINTER)
        (tmp / "sweep.toml").write_text(SWEEP.replace("NBYTES", str(nbytes)))
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                DRIVER,
                str(tmp / "sweep.toml"),
                "--out",
                str(tmp / "out"),
                "--local-cpus",
                str(local_cpus),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise RuntimeError(f"the sweep printing {nbytes} bytes failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        rows = (tmp / "out" / "results.csv").read_text().splitlines()
        if "0.5" not in rows[1]:
            raise RuntimeError(f"the trial's metric was not read: {rows}")
        kb = [int(l.split()[1]) for l in r.stderr.splitlines() if l.startswith("MAXRSS_KB")]
        return kb[-1] / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024, help="what the big trial prints, in MB (default 1024)")
    a = p.parse_args(argv)
    small = driver_peak_rss_mb(1024)
    big = driver_peak_rss_mb(a.mb * 1024 * 1024)
    print(
        f"stdout_rss: driver peak RSS {big:.0f} MB for a trial printing {a.mb} MB vs {small:.0f} MB for 1 KB: +{big - small:.0f} MB (goal: within 50 MB)"
    )
    print("JSON", json.dumps({"bench": "stdout_rss", "mb": a.mb, "small_mb": round(small, 1), "big_mb": round(big, 1)}))


if __name__ == "__main__":
    main()
