"""The run lease's cost on S3 (a local moto server): requests per minute of one run's owner.

What a run pays at ``lease.heartbeat_s``: the driver's renewal (one conditional PUT a
heartbeat) and training rank 0's fence (one GET a heartbeat; the extra GET before each
checkpoint is not counted here). The requests are counted where they arrive, at the server,
over ``--seconds`` while a stand-in rank 0 asks the fence at every 0.25 s "step"; the latency
of one renewal is the median of ``--renewals``.

    python bench/lease_cost.py [--heartbeat 10] [--seconds 60]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.lease import Fence, Lease  # noqa: E402
from tests.support.services import moto_s3  # noqa: E402


class Count(logging.Handler):
    """HTTP requests the moto server logs, by method."""

    def __init__(self):
        super().__init__()
        self.by_method: collections.Counter = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        for method in ("GET", "PUT", "HEAD", "DELETE", "POST"):
            if f'"{method} ' in line:
                self.by_method[method] += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heartbeat", type=float, default=10.0, help="lease.heartbeat_s (the default: 10)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--renewals", type=int, default=20)
    args = p.parse_args()
    count = Count()
    logging.getLogger("werkzeug").addHandler(count)
    with moto_s3("bench") as (_, env):
        os.environ.update(env)
        url = "s3://bench/run/LEASE"
        lease = Lease(url, args.heartbeat, 6 * args.heartbeat)
        lease.acquire()
        took = []
        for _ in range(args.renewals):
            t = time.perf_counter()
            lease.renew()
            took.append(time.perf_counter() - t)
        fence = Fence(url, lease.token, args.heartbeat)
        count.by_method.clear()
        lease.start()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            assert not fence.lost()
            time.sleep(0.25)
        seen = dict(count.by_method)
        lease.release()
    per_min = {m: n * 60 / args.seconds for m, n in sorted(seen.items())}
    print(
        f"heartbeat {args.heartbeat:g}s over {args.seconds:g}s: {sum(seen.values())} requests "
        f"({', '.join(f'{m} {n:.1f}/min' for m, n in per_min.items())})"
    )
    print(
        f"one renewal (conditional PUT, moto on 127.0.0.1): median {statistics.median(took) * 1000:.1f} ms "
        f"of {args.renewals}"
    )


if __name__ == "__main__":
    main()
