"""When two budgets are the same one: the single matching rule for every reader of a plan,
a checkpoint or a bundle (torch-free, so the runtime and the manifest use it too).

A budget β is a kept fraction in (0, 1] (DESIGN.md §3). Budgets are compared, never
tested for float equality: a user types `0.6` for what the planner may hold as
0.6000000000000001 (evenly spaced budgets are rounded to 12 decimals).
"""

from __future__ import annotations

from collections.abc import Iterable

# Absolute, since β lies in (0, 1]. Wide enough for float noise (JSON round-trips a float
# exactly; arithmetic on budgets and 12-decimal rounding leave < 1e-12), narrow enough that
# no two real budgets collide: the planner refuses two budgets this close as one given twice.
BUDGET_TOLERANCE = 1e-9


def same_budget(a: float, b: float) -> bool:
    """True when budgets `a` and `b` are the same (within `BUDGET_TOLERANCE`)."""
    return abs(float(a) - float(b)) <= BUDGET_TOLERANCE


def match_budget(beta: float, budgets: Iterable[float], what: str = "one of the plan's budgets",
                 error: type[ValueError] = ValueError) -> float:
    """The member of `budgets` that is the same budget as `beta`, as stored there.

    Raises `error` (a ValueError subclass the caller names, e.g. a bundle error) when none
    is: "budget 0.7 is not one of the plan's budgets [0.6, 1.0]: choose one of them";
    `what` is the phrase between "is not" and the list.
    """
    budgets = list(budgets)
    for budget in budgets:
        if same_budget(budget, beta):
            return budget
    raise error(f"budget {beta} is not {what} {[float(b) for b in budgets]}: "
                "choose one of them")
