"""A tiny factorised Llama with a plan, shared by the distillation/elastic tests."""

from __future__ import annotations

import copy

from conftest import tiny_llama, token_batches

from flexrank.compress.config import ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.probe import probe
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.planning.planner import plan as make_plan

BUDGETS = [0.6, 0.8, 1.0]


def tiny_elastic(seed: int = 0, budgets=BUDGETS):
    """(student, teacher, plan, train batches, eval batches) on a tiny random Llama."""
    teacher = tiny_llama(seed=seed, init_std=0.2)
    student = copy.deepcopy(teacher)
    train = token_batches(100, num=32, batch=4, seq=16, seed=seed)
    held_out = token_batches(100, num=2, batch=4, seq=16, seed=seed + 100)
    factorize_(student, collect_covariances(student, train, progress=False), progress=False)
    sens = probe(student, teacher, train[:1], ProbeConfig(mode="exact", num_levels=4),
                 progress=False)
    return student, teacher, make_plan(sens, budgets=budgets), train, held_out


class StandInPlan:
    """The three attributes of a NestedPlan that ElasticModel and the exporters use."""

    def __init__(self, table: dict[float, dict[str, int]]):
        self.table = table
        self.budgets = sorted(table)
        self.layer_names = list(table[self.budgets[0]])

    def ranks_for(self, beta):
        return dict(self.table[beta])


def nested_plan(model, fractions=(0.5, 0.75, 1.0)) -> StandInPlan:
    """Each layer keeps round(f · max_rank) at budget f: nested, full rank at 1.0."""
    layers = nested_layers(model)
    return StandInPlan({f: {name: max(1, round(f * layer.max_rank))
                            for name, layer in layers.items()} for f in fractions})
