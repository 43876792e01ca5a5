"""Run the kernels' property suite (`minifd check`) over a range of hypothesis seeds and count, per
property, the seeds it passed: the evidence that no bound fails on luck.

    python3 scripts/seed_sweep.py [--device cpu|cuda] [--seeds 0-49] [--examples 200] [--jobs N] [--only A,B]

--jobs runs that many seeds side by side, each in its own process (on a GPU they share the device).

Prints one line per property (seeds passed / seeds run, the failing seeds) and exits 1 if any failed.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def seed_range(text):
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=seed_range, default=seed_range("0-49"), help="first-last (inclusive)")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1, help="seeds checked side by side")
    parser.add_argument("--only", default=None, help="comma-separated property names (minifd check --only)")
    args = parser.parse_args()
    passed, failed = defaultdict(int), defaultdict(list)
    with tempfile.TemporaryDirectory() as directory:
        def check(seed):
            report_path = Path(directory) / f"check-{seed}.json"
            subprocess.run([sys.executable, "-c", "from minifd.cli import main; main()", "check", "--device",
                            args.device, "--examples", str(args.examples), "--seed", str(seed), "--json",
                            str(report_path)] + (["--only", args.only] if args.only else []),
                           stdout=subprocess.DEVNULL, check=False)
            entries = json.loads(report_path.read_text())["properties"]
            print(f"seed {seed}: {sum(not entry['passed'] for entry in entries)} failed", file=sys.stderr, flush=True)
            return seed, entries

        with ThreadPoolExecutor(args.jobs) as pool:
            for seed, entries in sorted(pool.map(check, args.seeds)):
                for entry in entries:
                    if entry["passed"]:
                        passed[entry["name"]] += 1
                    else:
                        failed[entry["name"]].append(seed)
    runs = len(args.seeds)
    print(f"{args.device}, seeds {args.seeds.start}-{args.seeds.stop - 1}, {args.examples} examples each")
    for name in sorted(set(passed) | set(failed)):
        print(f"{name:30s} {passed[name]:3d} / {runs} passed" + (f"   failed seeds: {failed[name]}" if failed[name] else ""))
    sys.exit(1 if any(failed.values()) else 0)


if __name__ == "__main__":
    main()
