"""``python -m pipeline.checkpoint export ...``: a checkpoint as timm weights, a transformers
folder or an MLflow Model (``pipeline.export``, ``pipeline.mlflow_model``).

Its own module because it needs all of them: ``pipeline.checkpoint``'s command line hands it
the ``export`` subcommand by name, so the checkpoint library does not import what imports it.
"""

from __future__ import annotations

from pipeline import checkpoint, mlflow_model
from pipeline.export import load_export, write_hf, write_timm


def main(argv: list[str]) -> int:
    """``python -m pipeline.checkpoint export ...`` (see ``pipeline.checkpoint.USAGE``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.checkpoint export")
    parser.add_argument("source", help="run dir or checkpoints dir (any fsspec URL)")
    parser.add_argument("tag", help="a tag such as step_00000400, or 'latest'")
    parser.add_argument("out", help="timm: a .safetensors file; hf and mlflow: a new folder")
    parser.add_argument("variant", nargs="?", default="raw", choices=checkpoint.VARIANTS)
    parser.add_argument("--format", default="timm", choices=("timm", "hf", "mlflow"))
    parser.add_argument(
        "--register", help="mlflow: log the model to the run's MLflow run and register it under this name"
    )
    parser.add_argument("--tracking-uri", help="mlflow: the tracking server (default: the run's)")
    args = parser.parse_args(argv)
    export = load_export(args.source, None if args.tag == "latest" else args.tag, args.variant)
    if args.format == "timm":
        print(write_timm(export, args.out))
    elif args.format == "hf":
        print(write_hf(export, args.out))
    else:
        print(mlflow_model.save(export, args.out))
        if args.register:
            print(mlflow_model.log_and_register(export, args.register, args.out, args.tracking_uri))
    return 0
