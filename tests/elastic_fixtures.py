"""A tiny factorised Llama with a plan, shared by the distillation/elastic tests."""

from __future__ import annotations

import copy

from conftest import tiny_llama, token_batches

from flexrank.covariance import collect_covariances
from flexrank.planner import plan as make_plan
from flexrank.probe import ProbeConfig, probe
from flexrank.surgery import factorize_

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
