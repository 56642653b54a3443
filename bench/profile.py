"""Summarise py-spy's collapsed stacks: where a request's time goes.

    python bench/profile.py RESULTS/profile-psycopg-one-ours-1.txt [--focus worker.py:run]

Prints the functions with the most inclusive and self samples, as shares of the
samples that pass through ``--focus`` (the worker threads' loop by default).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--focus", default="run (worker.py")
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    for path in args.files:
        inclusive: collections.Counter[str] = collections.Counter()
        self_: collections.Counter[str] = collections.Counter()
        total = 0
        for line in open(path):
            stack, _, count = line.rstrip().rpartition(" ")
            if args.focus not in stack:
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
            frames = frames[next(i for i, f in enumerate(frames) if args.focus in f):]
            for f in set(frames):
                inclusive[f] += n
            self_[frames[-1]] += n
        print(f"== {path}: {total} samples in {args.focus!r}")
        print("-- inclusive")
        for f, n in inclusive.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {f}")
        print("-- self")
        for f, n in self_.most_common(args.top // 2):
            print(f"{100 * n / total:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
