"""A finished checkpoint where its users use it: timm weights, a Hugging Face transformers
folder, an MLflow Model (``pipeline.mlflow_model``), each with a model card.

One export path, three wrappers: :func:`load_export` reads a complete checkpoint of a run dir
(any fsspec URL, so any host of a multi-host run can export it) into one :class:`Export` —
the consolidated fp32 weights in timm's names, the architecture, how evaluation preprocesses
an image, the pre-training data and the transfer results recorded for that tag. Every form
is written from it, so the weights are the same values in each:

- **timm**: ``model.safetensors`` (timm's names), written by ``checkpoint.write_weights``.
- **transformers** (:func:`write_hf`): ``config.json``, ``model.safetensors`` in the Hub's
  ViT names (``google/vit-*``), ``preprocessor_config.json``. A class-token ViT without a
  pre-logits layer is a ``ViTForImageClassification``; one with it is a ``ViTModel`` whose
  pooler (Dense + tanh on the final LayerNorm's class token) *is* our pre-logits layer, as
  Google's i21k checkpoints are published, with the pre-training head beside it in
  ``pretraining_head.safetensors``: ``ViTForImageClassification`` classifies from the
  LayerNorm's class token without the pooler, so it cannot give that model's logits.
  Global average pooling has no transformers ViT at all and is refused.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch

from pipeline import checkpoint
from pipeline.config import to_yaml
from pipeline.data import ShardIndex, eval_resize
from pipeline.model import VisionTransformer, create_model, get_spec
from pipeline.rundir import Checkpoints, RunDir, local_path

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
HEAD_FILE = "pretraining_head.safetensors"
DEFAULT_CROP_RATIO = 0.875  # FewShotConfig's: resize 256, centre crop 224


class ExportError(ValueError):
    """A checkpoint that cannot be expressed in the asked form; the message says what does not fit."""


@dataclass
class Export:
    """Everything a wrapper needs of one checkpoint (see the module docstring)."""

    tag: str
    variant: str
    state: dict[str, torch.Tensor]  # fp32, timm names
    arch: dict  # create_model keyword arguments: name, spec fields, pool, representation_size, num_classes
    preprocess: dict  # image_size, crop_ratio, resize, mean, std
    meta: dict
    config_yaml: str
    data: dict  # the pre-training index: url, name, samples, classes, multi_label (what could be read)
    recipe: dict  # the key settings of the run's config
    results: dict[str, dict] = field(default_factory=dict)  # eval name -> metrics recorded for this tag
    tracking_uri: str | None = None  # where the run was tracked (its config's tracking.uri)

    def model(self) -> VisionTransformer:
        """Our ViT with these weights, in eval mode."""
        model = create_model(**self.arch)
        model.load_state_dict(self.state, strict=True)
        return model.eval()

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state.values())


def load_export(source: str, tag: str | None = None, variant: str = "raw") -> Export:
    """The :class:`Export` of checkpoint ``tag`` (default: the latest complete one) of a run dir,
    its checkpoints dir, or any dir of tags (any fsspec URL); a remote tag is fetched to a
    temporary dir, so any host that reads the run dir can export."""
    run = RunDir.of(source)
    ckpts = run.checkpoints
    if tag is not None and not ckpts.is_complete(tag) and Checkpoints(source).is_complete(tag):
        ckpts = Checkpoints(source)  # a staging dir or a copy of tags: no run dir records around it
    tag = tag or ckpts.latest()
    if tag is None:
        raise FileNotFoundError(f"{ckpts.url}: no complete checkpoint to export")
    if ckpts.local:
        return _read(local_path(ckpts.url), tag, variant, run)
    with tempfile.TemporaryDirectory(prefix="vit-export-") as tmp:
        ckpts.fetch(tag, tmp)
        return _read(tmp, tag, variant, run)


def _read(ckpt_dir: str, tag: str, variant: str, run: RunDir) -> Export:
    cfg, meta = checkpoint.saved_config(Path(ckpt_dir) / tag)
    state = checkpoint.load_fp32_weights(ckpt_dir, tag, variant)
    arch = _arch(cfg.model, meta, state)
    crop_ratio = float(cfg.eval.fewshot[0].crop_ratio if cfg.eval.fewshot else DEFAULT_CROP_RATIO)
    size = arch["img_size"]
    preprocess = {
        "image_size": size,
        "crop_ratio": crop_ratio,
        "resize": eval_resize(size, crop_ratio),
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resample": "bilinear",
    }
    results = {
        name: {"protocol": rec.get("protocol"), "dataset": rec.get("dataset"), "metrics": rec.get("metrics", {})}
        for name, rec in run.eval_records().get(tag, {}).items()
        if rec.get("variant", "raw") == variant
    }
    return Export(
        tag=tag,
        variant=variant,
        state=state,
        arch=arch,
        preprocess=preprocess,
        meta=meta,
        config_yaml=to_yaml(cfg),
        data=_data_facts(cfg.data.train, arch["num_classes"]),
        recipe=_recipe(cfg, meta),
        results=results,
        tracking_uri=cfg.tracking.uri,
    )


def _arch(model_cfg, meta: dict, state: dict[str, torch.Tensor]) -> dict:
    """``create_model`` keyword arguments of the checkpoint, every spec field spelled out."""
    spec = get_spec(
        model_cfg.name, img_size=meta.get("image_size") or model_cfg.img_size, patch_size=model_cfg.patch_size
    )
    return {
        "name": model_cfg.name,
        "width": spec.width,
        "depth": spec.depth,
        "heads": spec.heads,
        "mlp_dim": spec.mlp_dim,
        "patch_size": spec.patch_size,
        "img_size": spec.img_size,
        "pool": _name(model_cfg.pool),
        "representation_size": model_cfg.representation_size,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
    }


def _recipe(cfg, meta: dict) -> dict:
    """The run's key settings, for the model card."""
    return {
        "loss": _name(cfg.train.loss),
        "precision": _name(cfg.train.precision),
        "global_batch_size": cfg.train.global_batch_size,
        "steps": meta.get("total_steps", cfg.train.steps),
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "warmup_steps": cfg.optim.warmup_steps,
        "schedule": _name(cfg.optim.schedule),
        "dropout": cfg.model.dropout,
        "drop_path": cfg.model.drop_path,
        "augmentation": cfg.aug.preset,
        "ema_decay": cfg.train.ema.decay,
        "zero_stage": cfg.deepspeed.zero_stage,
    }


def _name(value) -> str:
    """A config choice (an Enum member or its string) as its name."""
    return str(getattr(value, "value", value))


def _data_facts(index_url: str, num_classes: int) -> dict:
    """What the pre-training index says (name, samples, classes); only the URL when it cannot be read here."""
    try:
        index = ShardIndex.load(index_url)
        with fsspec.open(index_url, "r") as f:
            name = json.load(f).get("name")
    except Exception as e:  # an index on storage this host cannot reach: the card says so
        log.warning("pre-training index %s not readable here (%s): the model card names only its URL", index_url, e)
        return {"url": index_url, "num_classes": num_classes}
    return {
        "url": index_url,
        "name": name or Path(index_url).name,
        "samples": index.num_samples,
        "classes": list(index.classes),
        "num_classes": num_classes,
        "multi_label": index.multi_label,
    }


# ---------------------------------------------------------------- timm


def write_timm(export: Export, out_path: str) -> str:
    """The timm-named safetensors file (``checkpoint.write_weights``: the bytes of every form)."""
    return checkpoint.write_weights(export.state, out_path, export.tag, export.variant)


# ---------------------------------------------------------------- Hugging Face transformers


def hf_misfits(arch: dict) -> list[str]:
    """What of this architecture transformers' ViT cannot express (empty: it fits)."""
    problems = []
    if arch["pool"] != "token":
        problems.append(
            f"pool={arch['pool']}: transformers' ViT classifies from the class token; it has no "
            "global-average-pooling variant"
        )
    if arch["width"] % arch["heads"]:
        problems.append(f"heads={arch['heads']} does not divide width={arch['width']}")
    return problems


def hf_config(export: Export) -> dict:
    """``config.json`` of the transformers folder (``ViTConfig`` keys)."""
    a = export.arch
    pre_logits = a["representation_size"] is not None
    cfg = {
        "model_type": "vit",
        "architectures": ["ViTModel" if pre_logits or not a["num_classes"] else "ViTForImageClassification"],
        "hidden_size": a["width"],
        "num_hidden_layers": a["depth"],
        "num_attention_heads": a["heads"],
        "intermediate_size": a["mlp_dim"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": a["img_size"],
        "patch_size": a["patch_size"],
        "num_channels": 3,
        "qkv_bias": True,
        "encoder_stride": a["patch_size"],
        "torch_dtype": "float32",
    }
    if pre_logits:
        cfg.update(pooler_output_size=a["representation_size"], pooler_act="tanh")
    elif a["num_classes"]:
        classes = export.data.get("classes") or [str(i) for i in range(a["num_classes"])]
        if len(classes) != a["num_classes"]:
            classes = [str(i) for i in range(a["num_classes"])]
        cfg.update(
            id2label={str(i): c for i, c in enumerate(classes)},
            label2id={c: i for i, c in enumerate(classes)},
            problem_type="multi_label_classification"
            if export.recipe["loss"] == "sigmoid"
            else "single_label_classification",
        )
    return cfg


def hf_state_dict(export: Export) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our weights under the Hub's ViT names (``vit.`` prefixed for ``ViTForImageClassification``,
    bare for ``ViTModel``), and the pre-training head kept apart (pre-logits models only)."""
    s, a = export.state, export.arch
    classify = a["representation_size"] is None and a["num_classes"] > 0
    p = "vit." if classify else ""
    out = {
        f"{p}embeddings.cls_token": s["cls_token"],
        f"{p}embeddings.position_embeddings": s["pos_embed"],
        f"{p}embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        f"{p}embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        f"{p}layernorm.weight": s["norm.weight"],
        f"{p}layernorm.bias": s["norm.bias"],
    }
    names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(a["depth"]):
        ours, theirs = f"blocks.{i}.", f"{p}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for src, dst in names.items():
                out[f"{theirs}{dst}.{kind}"] = s[f"{ours}{src}.{kind}"]
            for part, qkv in zip(("query", "key", "value"), s[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0), strict=True):
                out[f"{theirs}attention.attention.{part}.{kind}"] = qkv
    head = {}
    if classify:
        out["classifier.weight"], out["classifier.bias"] = s["head.weight"], s["head.bias"]
    elif a["representation_size"] is not None:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = s["pre_logits.fc.weight"], s["pre_logits.fc.bias"]
        if "head.weight" in s:
            head = {"classifier.weight": s["head.weight"], "classifier.bias": s["head.bias"]}
    return {k: v.contiguous() for k, v in out.items()}, {k: v.contiguous() for k, v in head.items()}


def hf_preprocessor(export: Export) -> dict:
    """``preprocessor_config.json``: CLIP's processor does what our evaluation does (shorter
    side to ``size / crop_ratio``, bilinear; centre crop; x / 127.5 - 1); ViT's own resizes
    to a square without a crop."""
    p = export.preprocess
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": p["resize"]},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": p["image_size"], "width": p["image_size"]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": p["mean"],
        "image_std": p["std"],
        "do_convert_rgb": True,
    }


def write_hf(export: Export, out_dir: str) -> str:
    """A transformers folder (see the module docstring); raises :class:`ExportError` naming what
    of the architecture transformers' ViT cannot express."""
    from safetensors.torch import save_file

    if problems := hf_misfits(export.arch):
        raise ExportError(
            f"checkpoint {export.tag} ({export.arch['name']}) cannot be a transformers ViT: "
            + "; ".join(problems)
            + ". Export it for timm or MLflow instead"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, head = hf_state_dict(export)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if head:
        save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(export), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(hf_preprocessor(export), indent=2))
    (out / CARD_FILE).write_text(model_card(export))
    return str(out)


# ---------------------------------------------------------------- the model card


def model_card(export: Export) -> str:
    """README.md of every export: what the model is, what it was trained on and how, how it
    transferred, and how to load it in timm, transformers and MLflow."""
    a, d, r, p = export.arch, export.data, export.recipe, export.preprocess
    head = (
        f"pre-logits layer {a['representation_size']} (Dense + tanh), " if a["representation_size"] else ""
    ) + f"{a['num_classes']}-class head ({r['loss']})"
    lines = [
        f"# {a['name']} — checkpoint {export.tag} ({export.variant} weights)",
        "",
        "Pre-trained with the vit-pretrain pipeline (ViT, Dosovitskiy et al. 2020).",
        "",
        "## Architecture",
        "",
        f"- ViT: width {a['width']}, depth {a['depth']}, heads {a['heads']}, MLP {a['mlp_dim']}, patch "
        f"{a['patch_size']}, {a['img_size']} px, pooling `{a['pool']}`, {head}",
        f"- parameters: {export.num_params:,}",
        "",
        "## Pre-training data",
        "",
    ]
    if "samples" in d:
        lines += [
            f"- index: `{d['name']}` ({d['url']})",
            f"- samples: {d['samples']:,}",
            f"- classes: {d['num_classes']}"
            + (" (multi-label)" if d.get("multi_label") else "")
            + (
                f": {', '.join(d['classes'][:20])}{' ...' if len(d['classes']) > 20 else ''}"
                if d.get("classes")
                else ""
            ),
        ]
    else:
        lines += [f"- index: {d['url']} (not readable where this card was written)", f"- classes: {d['num_classes']}"]
    lines += [
        "",
        "## Training",
        "",
        f"- steps: {export.meta.get('step')} of {r['steps']}, samples seen {export.meta.get('samples_seen', 0):,}",
        f"- global batch {r['global_batch_size']}, world size {export.meta.get('world_size')}",
        f"- recipe: lr {r['lr']}, weight decay {r['weight_decay']}, warmup {r['warmup_steps']} steps, "
        f"{r['schedule']} decay, loss {r['loss']}, precision {r['precision']}, dropout {r['dropout']}, "
        f"drop path {r['drop_path']}, augmentation `{r['augmentation']}`, EMA decay {r['ema_decay']}, "
        f"ZeRO stage {r['zero_stage']}",
        "",
        "## Transfer results recorded for this checkpoint",
        "",
    ]
    if export.results:
        lines += ["| evaluation | protocol | dataset | metric | value |", "|---|---|---|---|---|"]
        for name, res in sorted(export.results.items()):
            lines += [
                f"| {name} | {res['protocol']} | {res['dataset']} | {k} | {v:.4f} |"
                for k, v in sorted(res["metrics"].items())
            ]
    else:
        lines += ["None recorded in the run dir for this checkpoint."]
    lines += [
        "",
        "## Preprocessing",
        "",
        f"RGB; shorter side resized (bilinear) to {p['resize']} px, centre crop {p['image_size']} px, "
        "pixels scaled to [-1, 1] (x / 127.5 - 1). The MLflow model and the transformers image "
        "processor do it for you.",
        "",
        "## Loading",
        "",
        loading(export).strip(),
        "",
    ]
    return "\n".join(lines)


def loading(export: Export) -> str:
    """The card's "how to load it" for timm, transformers and MLflow, with this model's numbers."""
    a = export.arch
    pool = "token" if a["pool"] == "token" else "avg"
    if a["representation_size"]:
        timm = (
            "timm's `VisionTransformer` has no pre-logits (representation) layer, so this model's "
            "`pre_logits.fc.*` weights do not fit it: use transformers' `ViTModel` or `pipeline.model`."
        )
        hf_class, hf_out = (
            "ViTModel",
            (
                "features = model(**inputs).pooler_output  # our pre-logits features\n"
                'head = safetensors.torch.load_file(f"{folder}/pretraining_head.safetensors")\n'
                'logits = features @ head["classifier.weight"].T + head["classifier.bias"]'
            ),
        )
    else:
        timm = f"""```python
import safetensors.torch
from timm.models.vision_transformer import VisionTransformer
model = VisionTransformer(img_size={a["img_size"]}, patch_size={a["patch_size"]}, embed_dim={a["width"]},
                          depth={a["depth"]},
                          num_heads={a["heads"]}, mlp_ratio={a["mlp_dim"] / a["width"]}, num_classes={a["num_classes"]},
                          global_pool="{pool}", class_token={a["pool"] == "token"}, fc_norm=False)
model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
```"""
        hf_class, hf_out = "ViTForImageClassification", "logits = model(**inputs).logits"
    hf = (
        ""
        if hf_misfits(a)
        else f"""
transformers (the folder of `python -m pipeline.checkpoint export <run dir> {export.tag} <folder> --format hf`):

```python
import safetensors.torch
from transformers import AutoImageProcessor, {hf_class}
processor = AutoImageProcessor.from_pretrained(folder)
model = {hf_class}.from_pretrained(folder)
inputs = processor(images=[pil_image], return_tensors="pt")
{hf_out}
```
"""
    )
    return f"""timm (`model.safetensors` of `--format timm`, timm's names):

{timm}
{hf}
MLflow (the registered model; `image` holds encoded JPEG/PNG bytes or HxWx3 uint8 arrays):

```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/<name>/<version>")
logits = model.predict(pd.DataFrame({{"image": [open("cat.jpg", "rb").read()]}}))
features = model.predict(pd.DataFrame({{"image": [...]}}), params={{"output": "features"}})
module = mlflow.pytorch.load_model("models:/<name>/<version>")  # NCHW float in [-1, 1]
```

Served: `mlflow models serve -m models:/<name>/<version> --env-manager local`, then POST
`{{"dataframe_split": {{"columns": ["image"], "data": [["<base64 of the JPEG>"]]}}}}` to `/invocations`.
"""
