"""Build (or load) the mini world and measure it.

python -m fedrefine_lib.world --seed 0 [--smoke] [--out results/mini/world.json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    from . import WorldConfig, build_world
    from .measure import measure_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data/mini")
    parser.add_argument("--smoke", action="store_true", help="tiny world (tests, CI)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--out", default=None, help="write the measurements here (JSON)")
    parser.add_argument("--no-measure", action="store_true")
    args = parser.parse_args()
    world = build_world(args.seed, WorldConfig.smoke() if args.smoke else None, args.root, force=args.force)
    if not args.no_measure:
        report = measure_world(world, args.out)
        print(
            json.dumps(
                {k: report[k] for k in ("standalone", "oracle", "rephrase", "acceptance", "leaked_test_entities")},
                indent=1,
                default=str,
            )[:20000]
        )


if __name__ == "__main__":
    main()
