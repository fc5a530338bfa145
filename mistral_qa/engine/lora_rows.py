"""LoRA applied per row: one batch can mix the bare base and several adapters.

For every PEFT LoRA linear layer the adapters' A matrices are stacked into one [sum(r), in]
matrix and their B matrices (scaling folded in) into one [out, sum(r)] matrix. A row's output is

    base(x) + ((x @ A_all.T) * keep) @ B_all.T

where `keep` is 1 on the rank columns of that row's adapter and 0 elsewhere (all 0 for the base),
so a mixed batch costs two thin matmuls per layer, whatever adapters its rows use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class LoraTable(NamedTuple):
    """One projection's adapters, stacked."""

    a: torch.Tensor  # [sum of ranks, in]: every adapter's A
    b: torch.Tensor  # [out, sum of ranks]: every adapter's B, scaling folded in
    owner: torch.Tensor  # [sum of ranks]: the adapter index of each rank column


class LoraTables(NamedTuple):
    """A decoder layer's seven projections: each its LoraTable, or None when no adapter touches it."""

    q_proj: LoraTable | None
    k_proj: LoraTable | None
    v_proj: LoraTable | None
    o_proj: LoraTable | None
    gate_proj: LoraTable | None
    up_proj: LoraTable | None
    down_proj: LoraTable | None


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


class LoraRows:
    def __init__(self, model: nn.Module, adapters: list[str], dtype: torch.dtype):
        """`model` is the PEFT-wrapped model (or a plain one: then there are no tables).
        Adapter i of `adapters` is selected by adapter index i; index -1 is the bare base."""
        self.adapters = list(adapters)
        self.tables: dict[nn.Module, LoraTable] = {}
        for name, module in model.named_modules():
            if not _is_lora_layer(module):
                continue
            if not isinstance(module.base_layer, nn.Linear) and not hasattr(module.base_layer, "weight"):
                raise ValueError(f"LoRA on {name} ({type(module.base_layer).__name__}) is not supported by the engine")
            present = [i for i, n in enumerate(self.adapters) if n in module.lora_A]
            if not present:
                continue
            a = [module.lora_A[self.adapters[i]].weight for i in present]
            b = [module.lora_B[self.adapters[i]].weight * module.scaling[self.adapters[i]] for i in present]
            owner = [i for i, w in zip(present, a, strict=True) for _ in range(w.shape[0])]
            self.tables[module] = LoraTable(
                torch.cat(a).to(dtype).contiguous(),
                torch.cat(b, dim=1).to(dtype).contiguous(),
                torch.tensor(owner, dtype=torch.long, device=a[0].device),
            )

    def layer_tables(self, layer: nn.Module) -> LoraTables:
        """The LoRA tables of the seven projections of a decoder layer."""
        attn, mlp = layer.self_attn, layer.mlp
        owners = {"q_proj": attn, "k_proj": attn, "v_proj": attn, "o_proj": attn}
        owners.update({"gate_proj": mlp, "up_proj": mlp, "down_proj": mlp})
        return LoraTables(**{name: self.tables.get(getattr(owner, name)) for name, owner in owners.items()})
