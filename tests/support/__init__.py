"""What the tests share: real data, real services, real process groups and hosts.

- ``data``: shards written the way data_prep writes them, digits shards, real checkpoints.
- ``services``: free ports, a moto S3 endpoint, an ``mlflow server``, a ``ray start --head``.
- ``prep``: running data_prep and reading back what it wrote.
- ``phases``: several trainings in one torchrun process group (``tests/workers/train_phases.py``).
- ``jobs``: ``python -m pipeline.run`` as a process, with its output lines and clean-up by pid.
- ``hosts`` and ``slurm``: network-namespace hosts without a shared disk, a real 2-node SLURM.
- ``knn_probe``: an evaluator plug-in named by module path in a config.
- ``tiers``: the test tiers, applied as markers from the fixtures a test uses.

Imported as ``tests.support.<module>`` (pytest puts the repository root on ``sys.path``).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "experiment" / "demo.yaml"
