"""The names under which a skipped sample is counted.

These strings appear in `_stats.json`, `{split}_index.json` and the job summary; they are
stable: add new ones, never rename.

Counted while planning (the entry never gets a key):
- `bad_manifest_line`: a manifest line that is not valid JSON / CSV, not an object, or has
  no path or no label field.
- `unknown_label`: a label name not in `classes_file`, or an integer label outside the
  class list.

Counted inside a shard task (the entry's key is left unused in the shard):
- `missing_file`: the file (or per-class tar) does not exist.
- `read_error`: the file exists but could not be read (permissions, a directory, I/O error).
- `empty_file`: zero bytes.
- `not_an_image`: bytes Pillow does not recognise as any image format (e.g. text named .jpg).
- `too_many_pixels`: width*height above `image.max_pixels` (decompression-bomb guard; the
  image is never decoded). Pillow's own limit, 2x `PIL.Image.MAX_IMAGE_PIXELS`, also applies.
- `truncated_image`: the header parses but the pixel data ends early.
- `decode_error`: any other failure to decode the pixel data.
- `process_error`: converting, resizing or encoding a decoded image failed.

Not failures: CMYK, palette, LA/RGBA (composited on white), 16-bit and 1-channel images
are converted to RGB and counted under `converted_modes` in the shard stats.

`FailureWatch` is the rule that stops a job early when too many samples fail.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BAD_MANIFEST_LINE = "bad_manifest_line"
UNKNOWN_LABEL = "unknown_label"
MISSING_FILE = "missing_file"
READ_ERROR = "read_error"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED_IMAGE = "truncated_image"
DECODE_ERROR = "decode_error"
PROCESS_ERROR = "process_error"

ALL = (
    BAD_MANIFEST_LINE,
    UNKNOWN_LABEL,
    MISSING_FILE,
    READ_ERROR,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TOO_MANY_PIXELS,
    TRUNCATED_IMAGE,
    DECODE_ERROR,
    PROCESS_ERROR,
)


class SampleError(Exception):
    """One sample cannot go into a shard; `reason` is one of the names above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def failed_in(stats: dict[str, Any]) -> int:
    """The failed samples of one shard's stats (near-duplicates a shard excluded are not
    failures: they count neither here nor in `successes`)."""
    return sum(stats["failures"].values())


STOP_DELTA = 1e-6  # chance, per check, that the "likely" rule stops a job that would pass


def rate_floor(failed: int, seen: int, delta: float = STOP_DELTA) -> float:
    """A failure rate that the samples not yet read exceed with probability at least
    1 - `delta`, when the `seen` ones are a uniform random sample of all (Hoeffding's
    inequality, which also holds for sampling without replacement)."""
    if seen <= 0:
        return 0.0
    return max(0.0, failed / seen - math.sqrt(math.log(1 / delta) / (2 * seen)))


@dataclass
class FailureWatch:
    """Tells, as shards finish, whether a job is bound to exceed `max_fraction`.

    With L samples listed, K failures known for certain (found while planning or in finished
    shards), R planned samples in no finished shard, and f of n samples failed among those
    read by shard tasks (finished shards, and the first samples of shards that gave up):
    - certain: K > max_fraction * L (failures only grow);
    - overwhelmingly likely: K + R * rate_floor(f, n) > max_fraction * L.
    The plan is a seeded uniform shuffle, so the samples read are a uniform random sample of
    the planned ones, and the second rule stops a job that would have passed with probability
    at most `STOP_DELTA` per check (S * STOP_DELTA for a job checked after each of S shards).
    It assumes that a sample fails for what it is (its path, its bytes), not for when it was
    read: a storage outage during the first shards breaks that, and the stop message then
    shows mostly `read_error`.
    """

    listed: int
    max_fraction: float
    remaining: int
    certain: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seen: int = 0
    seen_failed: int = 0
    partial: dict[Any, dict[str, Any]] = field(default_factory=dict)  # shards that gave up
    finished_shards: int = 0

    def finished(self, key: Any, stats: dict[str, Any]) -> None:
        """Count a shard whose `_stats.json` is written (this run's or an earlier one's)."""
        self.partial.pop(key, None)
        self.finished_shards += 1
        self.remaining -= stats["count"]
        self.seen += stats["count"]
        self.seen_failed += failed_in(stats)
        self.certain.update(stats["failures"])
        for reason, example in stats["examples"].items():
            self.examples.setdefault(reason, example)

    def gave_up(self, key: Any, stats: dict[str, Any]) -> None:
        """Count the first samples of a shard that gave up (it will be redone, so its failures
        are evidence, not yet certain)."""
        self.partial[key] = stats
        for reason, example in stats["examples"].items():
            self.examples.setdefault(reason, example)

    def verdict(self, extra_seen: int = 0, extra_failed: int = 0) -> str | None:
        """`"certain"`, `"likely"` (the rule above) or None; `extra_*` asks "what if these
        more samples were read and failed"."""
        limit = self.max_fraction * self.listed
        known = sum(self.certain.values())
        if known > limit:
            return "certain"
        seen = self.seen + sum(p["count"] for p in self.partial.values()) + extra_seen
        failed = self.seen_failed + extra_failed + sum(failed_in(p) for p in self.partial.values())
        if known + self.remaining * rate_floor(failed, seen) > limit:
            return "likely"
        return None

    def message(self, source: str, verdict: str, shards_total: int) -> str:
        """Why the job stopped: the rule that fired, the counts, each reason with an example,
        and what was kept."""
        by_reason = Counter(self.certain)
        for p in self.partial.values():
            by_reason.update(p["failures"])
        seen = self.seen + sum(p["count"] for p in self.partial.values())
        failed = self.seen_failed + sum(failed_in(p) for p in self.partial.values())
        how = (
            "is exceeded"
            if verdict == "certain"
            else f"will be exceeded (probability of error < {STOP_DELTA:g}: rule in data_prep.failures.FailureWatch)"
        )
        reasons = "; ".join(f"{r}: {n} (e.g. {self.examples.get(r, '?')})" for r, n in sorted(by_reason.items()))
        return (
            f"data prep of {source} stopped early: max_failure_fraction={self.max_fraction}"
            f" {how}: {sum(self.certain.values())} of {self.listed} listed samples failed "
            f"for certain, {failed} of the {seen} read so far failed "
            f"({failed / max(seen, 1):.1%}). Failures by reason: {reasons}. "
            f"{self.finished_shards} of {shards_total} shards finished and are kept; fix "
            f"the source and rerun the same command to resume (a shard's _stats.json marks "
            f"it done: delete it, or the output, to redo it)"
        )
