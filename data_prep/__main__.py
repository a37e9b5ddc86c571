"""`python -m data_prep <config.yaml> key=value ... [--dry-run]`: run a data-prep job.

Exit status: 0 done, 1 the job failed (too many bad samples: as soon as that is certain or
overwhelmingly likely, see `data_prep.failures.FailureWatch`; a shard task failed), 2 the
config or the source is unusable (nothing was started).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .config import load_config, with_absolute_paths
from .plan import build_plan
from .plan_format import Plan, load_plan


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the job (or only plan it with `--dry-run`), print the
    summary; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description="Shard an image corpus into webdataset tars, one Ray task per shard."
    )
    parser.add_argument("config", nargs="?", help="YAML file merged onto PrepConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. image.size=256")
    parser.add_argument(
        "--dry-run", action="store_true", help="list and plan only; print the plan summary, write nothing"
    )
    args = parser.parse_intermixed_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = with_absolute_paths(load_config(config, overrides))
        if args.dry_run:
            print(format_plan(load_plan(cfg) or build_plan(cfg, write=False)))
            return 0
        from .job import run_prep

        summary = run_prep(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def format_plan(plan: Plan) -> str:
    """The plan summary as `--dry-run` prints it."""
    s = plan.summary()
    lines = [
        f"source   {s['source']} ({s['source_kind']}): {s['listed']:,} samples listed, "
        f"{s['ignored']:,} non-image files ignored",
        f"failures while planning: {json.dumps(s['plan_failures'])}",
        f"classes  {s['num_classes']:,} (multi-label: {str(s['multi_label']).lower()})",
        f"{'split':<10}{'samples':>14}{'shards':>10}{'bytes estimate':>18}",
    ]
    for name, sp in s["splits"].items():
        lines.append(f"{name:<10}{sp['samples']:>14,}{sp['shards']:>10,}{_human_bytes(sp['bytes_estimate']):>18}")
    return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
