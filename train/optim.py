"""Named parameter groups -> frozen parameters and an AdamW over the trainable ones."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from cxrlite.train.spec import StageSpec, StageSpecError

logger = logging.getLogger(__name__)

ParamGroups = (
    Mapping[str, Iterable[nn.Parameter]]
    | Callable[[nn.Module], Mapping[str, Iterable[nn.Parameter]]]
)


def resolve_param_groups(
    model: nn.Module, param_groups: ParamGroups, spec: StageSpec
) -> dict[str, list[str]]:
    """Map each group name to the names of its parameters in `model`.

    Names, not Parameter objects, because FSDP replaces the Parameter objects when it
    shards; names survive wrapping. Every group in `spec.lr` must exist and vice versa, and
    no parameter may sit in two groups. Parameters in no group are frozen.
    """
    groups = param_groups(model) if callable(param_groups) else param_groups
    if not isinstance(groups, Mapping):
        raise StageSpecError(
            f"param_groups must be a mapping of name -> parameters, got {type(groups).__name__}"
        )
    missing = sorted(set(spec.lr) - set(groups))
    unknown = sorted(set(groups) - set(spec.lr))
    if missing or unknown:
        raise StageSpecError(
            f"stage {spec.name!r}: lr names groups {sorted(spec.lr)} but the model offers "
            f"{sorted(groups)} (missing: {missing}, without lr: {unknown})"
        )
    name_of = {id(p): n for n, p in model.named_parameters()}
    owner: dict[str, str] = {}
    resolved: dict[str, list[str]] = {}
    for group, params in groups.items():
        names = []
        for param in params:
            name = name_of.get(id(param))
            if name is None:
                raise StageSpecError(
                    f"group {group!r} holds a parameter that is not part of the model"
                )
            if name in owner and owner[name] != group:
                raise StageSpecError(
                    f"parameter {name!r} is in both group {owner[name]!r} and {group!r}"
                )
            if name not in owner:
                owner[name] = group
                names.append(name)
        if not names:
            raise StageSpecError(f"stage {spec.name!r}: parameter group {group!r} is empty")
        resolved[group] = names
    ungrouped = [n for n in name_of.values() if n not in owner]
    if ungrouped:
        logger.info("%d parameter tensor(s) belong to no group and stay frozen", len(ungrouped))
    return resolved


def apply_freezing(
    model: nn.Module, group_names: Mapping[str, list[str]], spec: StageSpec
) -> dict[str, int]:
    """Set requires_grad from the stage's rates; returns element counts per group."""
    trainable = {n for g in spec.trainable_groups for n in group_names[g]}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    params = dict(model.named_parameters())
    counts = {g: sum(params[n].numel() for n in names) for g, names in group_names.items()}
    for group, count in counts.items():
        state = f"lr {spec.lr[group]:g}" if spec.lr[group] > 0 else "frozen"
        logger.info("stage %s: group %-12s %12d parameters, %s", spec.name, group, count, state)
    return counts


def build_optimizer(
    model: nn.Module, group_names: Mapping[str, list[str]], spec: StageSpec, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the trainable groups; biases and norm gains (1-D tensors) get no decay."""
    params = dict(model.named_parameters())
    optimizer_groups = []
    for group in spec.trainable_groups:
        members = [params[n] for n in group_names[group]]
        decay = [p for p in members if p.ndim >= 2]
        no_decay = [p for p in members if p.ndim < 2]
        for suffix, subset, weight_decay in (
            ("decay", decay, spec.weight_decay),
            ("no_decay", no_decay, 0.0),
        ):
            if subset:
                optimizer_groups.append(
                    {
                        "params": subset,
                        "lr": spec.lr[group],
                        "weight_decay": weight_decay,
                        "name": f"{group}/{suffix}",
                        "group": group,
                    }
                )
    return torch.optim.AdamW(
        optimizer_groups,
        lr=max(spec.lr.values()),
        betas=spec.betas,
        eps=spec.adam_eps,
        fused=fused or None,
    )


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The rate of each named group for the next update."""
    return {g["group"]: float(g["lr"]) for g in optimizer.param_groups}


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]
