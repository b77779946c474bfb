"""HTTP path regexes: Python's backtracking `re` (the baseline) vs RE2, side by side.

The pattern is the ReDoS case of issue 11, ``/(a+)+$``, against ``/`` + n x ``a`` + ``!``
(no match: the worst case for a backtracking engine). Python's `re` doubles its time with
each extra character, so it is only run while a single match stays under ``--budget``
seconds; RE2 is run at every length. Also times a typical path rule for the per-request cost.

Command: ``.venv/bin/python bench/regex.py``
"""

from __future__ import annotations

import argparse
import re
import time

from flagella.policy.api import full_match


def seconds(fn: object, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=5.0, help="stop the re baseline past this many seconds")
    args = ap.parse_args()
    bomb = r"/(a+)+$"
    print("| path length | Python re | RE2 (flagella) |")
    print("|---|---|---|")
    baseline_alive = True
    for n in (16, 20, 22, 24, 26, 28, 29, 40, 1000, 100_000):
        path = "/" + "a" * n + "!"
        cell = "not run (exponential)"
        if baseline_alive:
            t = seconds(lambda p=path: re.fullmatch(bomb, p))
            cell = f"{t:.3f} s"
            baseline_alive = t * 4 < args.budget
        r2 = seconds(lambda p=path: full_match(bomb, p), repeat=100)
        print(f"| {n + 2} | {cell} | {r2 * 1e6:.1f} us |")
    typical = r"/v[0-9]+/(users|orders)/[A-Za-z0-9_-]{1,64}(\?.*)?"
    path = "/v1/users/" + "x" * 40 + "?page=2"
    t_re = seconds(lambda: re.fullmatch(typical, path), repeat=20000)
    t_r2 = seconds(lambda: full_match(typical, path), repeat=20000)
    print(f"\ntypical rule `{typical}`, 57-char path: re {t_re * 1e6:.2f} us, RE2 {t_r2 * 1e6:.2f} us per match")


if __name__ == "__main__":
    main()
