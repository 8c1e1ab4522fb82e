"""Command-line start-up: ``slideloop --help`` and ``slideloop status`` on the demo project, as subprocesses,
next to the raw bound measured in the same run: a bare ``python -c pass`` (the interpreter's own start) and
``python -c "import sqlalchemy, shapely"`` (what reading a project's labels needs at least).

    python bench/bench_cli.py [--repeat 5]

Each figure is the median of ``--repeat`` runs; nothing is asserted (machines are noisy).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _util import print_table  # noqa: E402


def wall(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Median wall and CPU (user + system) time of ``cmd`` over ``repeat`` runs, s (it must succeed).

    CPU time is the steadier figure on a shared machine: waiting for a core does not count in it."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    """Print the start-up table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "al_core.cli"]
    demo = Path(tempfile.mkdtemp(prefix="slideloop-bench-cli-")) / "demo"
    subprocess.run([*cli, "demo", "--dir", str(demo), "--prepare-only"], check=True, capture_output=True)
    bare = wall([sys.executable, "-c", "pass"], args.repeat)
    db = wall([sys.executable, "-c", "import sqlalchemy.orm, shapely"], args.repeat)
    rows = [{"command": "python -c pass (bound)", "wall s": bare[0], "cpu s": bare[1], "cpu vs db bound": ""},
            {"command": "import sqlalchemy.orm, shapely (bound)", "wall s": db[0], "cpu s": db[1],
             "cpu vs db bound": 1.0}]
    for name, argv in [("slideloop --help", ["--help"]), ("slideloop train --help", ["train", "--help"]),
                       ("slideloop status demo", ["status", str(demo)])]:
        t = wall([*cli, *argv], args.repeat)
        rows.append({"command": name, "wall s": t[0], "cpu s": t[1], "cpu vs db bound": t[1] / db[1]})
    print_table(rows, f"CLI start-up, median of {args.repeat} (goal: --help and status < 0.5 s)")


if __name__ == "__main__":
    main()
