"""The cost units costs are planned and drawn in (``--cost-unit``): no heavy imports, the CLI
lists them in ``slm --help``."""

from __future__ import annotations

from dataclasses import dataclass

from slm.errors import InputError


@dataclass(frozen=True)
class CostUnit:
    """How costs are planned and drawn: measured FLOPs, or measured device-hours (which show
    what FLOPs hide, e.g. pn's slower pretraining per token; paper Table 2)."""

    name: str
    pretrain: str  # column of trial_costs / aggregate_points
    spec: str
    label: str


COST_UNITS = {u.name: u for u in (
    CostUnit("flops", "c_pretrain_flops", "c_spec_flops", "FLOPs"),
    CostUnit("device-hours", "c_pretrain_hours", "c_spec_hours", "device-hours"),
)}


def cost_unit(name: str) -> CostUnit:
    """The registered cost unit ``name``; InputError listing the units otherwise."""
    if name not in COST_UNITS:
        raise InputError(f"cost unit '{name}' is unknown; use one of {', '.join(COST_UNITS)}")
    return COST_UNITS[name]


COST_UNIT_NAMES = tuple(COST_UNITS)
