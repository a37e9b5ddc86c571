"""Validate an experiment config before anything is started; used by the launch scripts.

``python launch/validate.py [--print KEY ...] <experiment.yaml> [key=value ...]``

Exits 0 when the config composes and validates and every path it reads exists or is made
by the run itself (``pipeline.config.check_paths``), printing the resolved value of each
``--print`` key, one per line, in order; else 2 with ``config error: <key>: ...`` on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from pipeline.config import ConfigError, check_paths, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    keys: list[str] = []
    while len(argv) >= 2 and argv[0] == "--print":
        keys.append(argv[1])
        argv = argv[2:]
    path = argv[0] if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
        check_paths(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            print(f"config error: {key}: no such key (or unset)", file=sys.stderr)
            return 2
        print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
