"""L-MAM's λ bank (Eq. 3): every merged target weight reparametrised as ``λ_i · W_source + (1 − λ_i) · W_target``
(with ``--align``, W_source re-indexed by the plan's permutations).

``λ_i = sigmoid(logit_i)`` keeps λ in [0, 1]; the source weight is a frozen, non-persistent buffer, the target
weight and the logits train (torch parametrizations). The logits live in one module on the model
(:data:`LAM_MODULE`) so that data-parallel training all-reduces their gradients too. At the end the merged
weights are baked into an ordinary checkpoint (:func:`baked_state_dict`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from mamcli.errors import MamError
from mamcli.merge import MergePlan, TensorStore

LAM_MODULE = "mam_lams"  # attribute under which the λ logits live on the model (so DDP syncs them)


class LamMerge(nn.Module):
    """Parametrization: the weight seen by the model is λ·source + (1 − λ)·target."""

    def __init__(self, source: torch.Tensor, logits: nn.Parameter, index: int) -> None:
        super().__init__()
        self.register_buffer("source", source.detach().clone(), persistent=False)
        self.logits = [logits]  # a list: the shared logits are not this module's parameter
        self.index = index

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.logits[0][self.index]).to(target.dtype)
        return lam * self.source + (1 - lam) * target


class LamBank(nn.Module):
    """The trainable λ logits: one per merged layer, or one per layer and part with ``per_part``."""

    def __init__(self, keys: list[str], init: float, per_part: bool) -> None:
        super().__init__()
        self.keys = keys
        self.per_part = per_part
        self.logits = nn.Parameter(torch.full((len(keys),), init))

    @staticmethod
    def key(layer: int, part: str, per_part: bool) -> str:
        """``"3"`` (one λ per layer) or ``"3.q"`` (per layer and part)."""
        return f"{layer}.{part}" if per_part else str(layer)

    def values(self) -> dict[str, float]:
        return {k: float(torch.sigmoid(v)) for k, v in zip(self.keys, self.logits.detach().cpu(), strict=True)}


def _module_of(model: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    path, _, attr = tensor_name.rpartition(".")
    return model.get_submodule(path), attr


def attach_learnable(model: nn.Module, plan: MergePlan, source: TensorStore, lam_init: float,
                     per_part: bool) -> LamBank:
    """Register λ-merge parametrizations on every planned target tensor (unfused layouts only). With an aligned
    plan (``plan.alignment``, see :func:`mamcli.merge.solve_alignment`) each source tensor is re-indexed as
    ``mam merge --align`` re-indexes it, so the start is λ · P_out · W_s · P_inᵀ + (1 − λ) · W_t."""
    if plan.options.align != "none" and plan.alignment is None:
        raise MamError("an aligned L-MAM plan needs its permutations first (merge.solve_alignment)")
    if any(p.target_rows is not None for p in plan.pairs):
        raise MamError("L-MAM needs separate q/k/v weights in the target (its attention is fused)")
    keys = sorted({LamBank.key(p.layer, p.part, per_part) for p in plan.pairs},
                  key=lambda k: [int(x) if x.isdigit() else x for x in k.split(".")])
    init = math.log(lam_init / (1 - lam_init)) if 0 < lam_init < 1 else (10.0 if lam_init >= 1 else -10.0)
    device = next(model.parameters()).device
    bank = LamBank(keys, init, per_part).to(device)
    model.add_module(LAM_MODULE, bank)
    for p in plan.pairs:
        module, attr = _module_of(model, p.target)
        src = source.get(p.source)
        src = (src if p.source_rows is None else src[p.source_rows[0]:p.source_rows[1]]).to(device)
        if plan.alignment is not None:
            src = plan.alignment.apply(p, src)
        key = LamBank.key(p.layer, p.part, per_part)
        parametrize.register_parametrization(module, attr, LamMerge(src.to(getattr(module, attr).dtype),
                                                                    bank.logits, keys.index(key)))
    return bank


def baked_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as an ordinary checkpoint: λ-merged tensors replaced by their merged value.

    Other parametrizations (HuBERT's weight-normed positional conv) are left as the model saves them.
    """
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{LAM_MODULE}.")}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, chain in module.parametrizations.items():
            if any(isinstance(p, LamMerge) for p in chain):
                prefix = f"{name}.parametrizations.{attr}."
                for key in [k for k in state if k.startswith(prefix)]:
                    del state[key]
                state[f"{name}.{attr}"] = getattr(module, attr).detach().clone()
    return state


def lam_table(bank: LamBank, plan: MergePlan, num_layers: int) -> dict[str, list[float]]:
    """Per part, λ of every layer (0 where nothing is merged): the form ``mam merge --lams`` reads."""
    values = bank.values()
    table = {p: [0.0] * num_layers for p in plan.options.parts}
    for pair in plan.pairs:
        table[pair.part][pair.layer] = values[LamBank.key(pair.layer, pair.part, bank.per_part)]
    return table
