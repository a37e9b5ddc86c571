"""The served model: images in, logits (or pre-logits features) out.

``predict`` takes a DataFrame with an ``image`` column of encoded JPEG/PNG bytes (base64 in a
served JSON request) or HxWx3 uint8 arrays (also a list of them, or an (N, H, W, 3) array),
preprocesses each exactly as evaluation does (bytes through ``pipeline.data.decode_eval``,
arrays through ``eval_crop``), and returns (N, classes) float32 logits, or with
``params={"output": "features"}`` the pre-logits features. An MLflow Model of this class is
written by ``pipeline.mlflow_model``; this module imports only what that model carries.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch


class ViTImages(mlflow.pyfunc.PythonModel):
    """Images in, logits (or pre-logits features) out; see the module docstring."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from pipeline.model import create_model

        info = json.loads(Path(context.artifacts["arch"]).read_text())
        self.preprocess = info["preprocess"]
        self.model = create_model(**info["arch"]).eval()
        self.model.load_state_dict(load_file(context.artifacts["weights"]), strict=True)

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        from pipeline.data import to_model_input

        output = (params or {}).get("output", "logits")
        if output not in ("logits", "features"):
            raise ValueError(f"params.output must be 'logits' or 'features', got {output!r}")
        images = _images(model_input)
        x = to_model_input(torch.from_numpy(np.stack([self._pixels(im) for im in images])))
        with torch.no_grad():
            out = self.model.forward_features(x) if output == "features" else self.model(x)
        return out.float().numpy()

    def _pixels(self, image) -> np.ndarray:
        from PIL import Image

        from pipeline.data import decode_eval, eval_crop

        size, ratio = self.preprocess["image_size"], self.preprocess["crop_ratio"]
        if isinstance(image, str):  # base64, as JSON carries bytes
            image = base64.b64decode(image)
        if isinstance(image, (bytes, bytearray)):
            return decode_eval(bytes(image), size, ratio)
        a = np.asarray(image)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"an image array must be HxWx3 uint8, got shape {a.shape} dtype {a.dtype}")
        return eval_crop(Image.fromarray(a), size, ratio)


def _images(model_input) -> list:
    """The images of a predict input: a DataFrame's (or dict's) ``image`` column, a list of
    images, or an (N, H, W, 3) uint8 array."""
    import pandas as pd

    if isinstance(model_input, (pd.DataFrame, dict)):
        if "image" not in model_input:
            raise ValueError(f"the input needs an 'image' column, got {list(model_input.keys())}")
        return list(model_input["image"])
    return list(model_input)
