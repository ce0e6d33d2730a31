#!/usr/bin/env python
"""Render the SLURM job of a recipe and submit it (or print it with --dry-run).

    python tools/submit.py configs/recipes/quickstart.yaml --nodes 2 --gpus-per-node 8 --time 12:00:00 \\
        --partition gpu optim.lr=1e-4

Every value is validated and quoted; one holding a newline, ';', '$(' or a backtick is refused.
"""

from __future__ import annotations

import argparse
import sys

from imontage.cluster.submit import JobSpec, SubmitError, render, submit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, passed to imontage-train")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="tasks per node (one per GPU)")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--time", default="01:00:00", help="SLURM time limit")
    parser.add_argument("--job-name", default="imontage")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument(
        "--max-requeues", type=int, default=3, help="requeues after preemption before giving up"
    )
    parser.add_argument("--log-dir", default="runs/slurm-logs")
    parser.add_argument("--env-hook", default="", help="script sourced before launch (site modules, conda)")
    parser.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    parser.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    spec = JobSpec(
        recipe=args.recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, job_name=args.job_name, partition=args.partition, account=args.account,
        max_requeues=args.max_requeues, log_dir=args.log_dir, env_hook=args.env_hook, python=args.python,
        overrides=list(args.overrides),
    )  # fmt: skip
    try:
        script = render(spec)
    except SubmitError as error:
        print(f"submit.py: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(script, end="")
        return 0
    print(f"submitted job {submit(script, spec.log_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
