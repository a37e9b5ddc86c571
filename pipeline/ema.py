"""Polyak / exponential moving average of the weights (AugReg's 0.9999), for pre-training and fine-tuning.

``ema = d * ema + (1 - d) * w`` after every ``every``-th optimizer step, in fp32, from the fp32
master weights. With ``warmup`` the decay is ``min(d, (1 + n) / (10 + n))`` at the n-th update
(TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so a short run is not dominated
by the initialisation.

Under DeepSpeed each rank averages only the piece of each parameter whose fp32 master it holds,
so no update needs communication and the EMA costs 4 bytes per parameter divided by the number
of ranks that share the master weights:

* ZeRO-3: the rank's partition of each parameter (``safe_get_local_fp32_param``; ``ds_tensor``
  layout: elements ``[rank * n, (rank + 1) * n)`` of the flattened parameter, padded);
* ZeRO-1/2: the rank's fragment of the flat fp32
  partition (``param._hp_mapping``; possibly none for a parameter);
* stage 0 with bf16/fp16 (DeepSpeed's ``FP16_UnfusedOptimizer``): the whole fp32 master of
  each parameter, on every rank (that optimizer does not partition);
* a plain fp32 engine (stage 0) or a bare module: the whole parameter, on every rank.

Measured (rank files of real checkpoints, 2 ranks): the demo ViT (820,964 parameters, ZeRO-2,
bf16) holds 410,482 fp32 EMA elements per rank (1.6 MB; a full copy would be 3.3 MB), and
vit_tiny_test under ZeRO-2 and ZeRO-3 9,714 of 19,428 per rank. The alternative, gathering
the full fp32 weights at every update, costs 4 bytes x all parameters on every rank plus an
all-reduce per parameter per update. :meth:`full_state_dict` (a
collective: every rank calls it) assembles whole tensors, zero-filled pieces summed by one
all-reduce per parameter, only when a checkpoint is written.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def fp32_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(low-precision param) -> its whole fp32 master, for DeepSpeed's stage-0 bf16/fp16 optimizer
    (``FP16_UnfusedOptimizer``: ``fp16_groups`` beside ``fp32_groups``); empty for any other."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    out = {}
    for g_low, g_high in zip(low or [], high or [], strict=False):
        if isinstance(g_high, (list, tuple)):
            out.update({id(a): b for a, b in zip(g_low, g_high, strict=False) if a.numel() == b.numel()})
    return out


def _pieces(module: torch.nn.Module, masters: dict[int, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    """name -> (this rank's fp32 master piece, flat offset of it in the parameter)."""
    out = {}
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_fp32_param

            local = safe_get_local_fp32_param(p)
            out[name] = (local.reshape(-1), rank * p.ds_tensor.ds_numel)
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
            if p._hp_mapping is not None:
                out[name] = (p._hp_mapping.get_hp_fragment().reshape(-1), p._hp_mapping.lp_fragment_address.start)
        elif id(p) in masters:  # stage 0 with bf16/fp16: the whole fp32 master
            out[name] = (masters[id(p)].detach().reshape(-1), 0)
        else:
            out[name] = (p.detach().reshape(-1), 0)
    return out


def _sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in module.parameters())


class EMA:
    """fp32 EMA of a (possibly DeepSpeed-wrapped) module's weights; see the module docstring."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int = 1, warmup: bool = False, optimizer=None):
        """``module`` is the engine's module; pass the engine's ``optimizer`` so that a stage-0
        bf16/fp16 engine averages its fp32 masters rather than the 16-bit weights."""
        self.module, self.decay, self.every, self.warmup = module, decay, max(1, every), warmup
        self.masters = fp32_masters(optimizer)
        self.shapes = {n: (tuple(getattr(p, "ds_shape", p.shape))) for n, p in module.named_parameters()}
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the module's current weights."""
        self.updates = 0
        self.shadow = {
            n: (t.detach().float().clone(), off) for n, (t, off) in _pieces(self.module, self.masters).items()
        }

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1.0 + updates) / (10.0 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Call after each optimizer step with the new global step; updates every ``every`` steps."""
        if global_step % self.every:
            return
        d = self.decay_at(self.updates)
        for name, (src, _) in _pieces(self.module, self.masters).items():
            self.shadow[name][0].lerp_(src.float(), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        """This rank's pieces (what an exact resume on the same world size restores)."""
        return {
            "decay": self.decay,
            "updates": self.updates,
            "pieces": {n: (t.cpu(), off) for n, (t, off) in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, (t, off) in state["pieces"].items():
            self.shadow[name][0].copy_(t)
            if self.shadow[name][1] != off:
                raise ValueError(f"EMA piece of {name} saved at offset {off}, held here at {self.shadow[name][1]}")

    def load_full(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Take whole fp32 tensors (an exported EMA, e.g. after a world-size change) into this rank's pieces."""
        self.updates = updates
        for name, (t, off) in self.shadow.items():
            flat = weights[name].reshape(-1).float()
            n = max(0, min(t.numel(), flat.numel() - off))
            t.zero_()
            t[:n].copy_(flat[off : off + n].to(t.device))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 tensors on CPU, on every rank; a collective when the pieces are sharded."""
        reduce = dist.is_initialized() and dist.get_world_size() > 1 and _sharded(self.module)
        # The collective runs where the engine's parameters live (the backend's device), even
        # when the pieces are offloaded to the CPU.
        comm_device = next(self.module.parameters()).device
        out = {}
        for name, shape in self.shapes.items():
            numel = 1
            for s in shape:
                numel *= s
            piece = self.shadow.get(name)
            full = torch.zeros(numel, dtype=torch.float32, device=comm_device)
            if piece is not None:
                t, off = piece
                n = max(0, min(t.numel(), numel - off))
                full[off : off + n] = t[:n].to(comm_device)
            if reduce:
                dist.all_reduce(full)
            out[name] = full.view(shape).cpu()
        return out
