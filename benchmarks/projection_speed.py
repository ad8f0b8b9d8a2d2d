"""Time to draw seeded projection matrices (version 2: md5 -> Philox4x32-10).

Draws a ``[64, 50_000]`` matrix of each kind (rademacher, normal) the way a build does
for a wide module, ``--reps`` times, and prints the fastest and median seconds per
draw. For reference: about 0.1 s for both kinds together on one core.

    python benchmarks/projection_speed.py [--rows 64] [--cols 50000] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bergson_ray.gradients.projection import random_matrix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=50_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for kind in ("rademacher", "normal"):
        seconds = []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            random_matrix(f"big{rep}/left", args.rows, args.cols, kind=kind)
            seconds.append(time.perf_counter() - t0)
        print(
            f"{kind:>10} [{args.rows}, {args.cols}]: fastest {min(seconds):.3f} s, "
            f"median {statistics.median(seconds):.3f} s per matrix"
        )


if __name__ == "__main__":
    main()
