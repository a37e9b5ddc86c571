"""The input pipeline: webdataset shards in, batches out, driven by the shard index.

- ``index``: the shard index that data_prep writes;
- ``tar``: samples read straight from a tar shard on any fsspec URL;
- ``readers``: what each reader reads (shards dealt per pass by seed, shuffled blocks);
- ``decode``: labels, training and evaluation crops, the model's input scaling;
- ``stream``: the training stream of one rank (a stream per reader), resumable exactly;
- ``canonical``: the canonical order (the same samples per step for any world size);
- ``eval_batches``: evaluation sets in index order.

The names below are the package's API; import them from ``pipeline.data``.
"""

from pipeline.config import default_streams  # defined with the config, whose check needs no torch
from pipeline.data.canonical import (
    CanonicalStream,
    merge_states,
    rank_streams,
    train_stream,
)
from pipeline.data.decode import (
    decode_eval,
    decode_train,
    eval_crop,
    eval_resize,
    inception_crop_box,
    multi_hot,
    sample_labels,
    to_model_input,
)
from pipeline.data.eval_batches import iter_eval_batches
from pipeline.data.index import ShardIndex
from pipeline.data.readers import Unit, make_units, reader_stream, reader_units, seeded_rng
from pipeline.data.stream import StreamSpec, TrainStream, batch_tensor
from pipeline.data.tar import iter_tar_files, iter_tar_samples

__all__ = [
    "CanonicalStream",
    "ShardIndex",
    "StreamSpec",
    "TrainStream",
    "Unit",
    "batch_tensor",
    "decode_eval",
    "decode_train",
    "default_streams",
    "eval_crop",
    "eval_resize",
    "inception_crop_box",
    "iter_eval_batches",
    "iter_tar_files",
    "iter_tar_samples",
    "make_units",
    "merge_states",
    "multi_hot",
    "rank_streams",
    "reader_stream",
    "reader_units",
    "sample_labels",
    "seeded_rng",
    "to_model_input",
    "train_stream",
]
