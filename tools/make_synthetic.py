"""Write the embedded synthetic data set (coloured shapes: edit, montage, video, edit_pair) as shards.

    python tools/make_synthetic.py --out data/synthetic [--samples 1600] [--per-shard 400]
    python tools/make_synthetic.py --out data/synthetic_pairs --tasks edit_pair   (DPO preference pairs)

The same arguments always give byte-identical shards; see ``imontage.dataprep.synthetic``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from imontage.dataprep.synthetic import ALL_TASKS, TASKS, format_summary, write_shards


def task_list(value: str) -> list[str]:
    tasks = [task.strip() for task in value.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in ALL_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(
            f"tasks are a comma-separated list of {', '.join(ALL_TASKS)}, got '{value}'"
        )
    return tasks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for train-NNNNNN.tar and summary.json")
    parser.add_argument("--samples", type=int, default=1600)
    parser.add_argument("--per-shard", type=int, default=400, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks",
        type=task_list,
        default=list(TASKS),
        help=f"round-robin by sample index, from {', '.join(ALL_TASKS)} (edit_pair: DPO preference pairs)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    summary = write_shards(
        args.out, args.samples, args.per_shard, args.seed, args.tasks, not args.no_progress
    )
    print(format_summary(summary))


if __name__ == "__main__":
    main()
