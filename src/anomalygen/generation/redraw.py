"""The redraw policy of the validity filter: which draw of a sample is written, and when a run stops.

A sample that fails the validity checks (``generation.validity``) is drawn again: redraw ``a`` of
sample ``i`` is sample ``i`` of the seed ``sub_seed(seed, i, a)``, so a re-run or a resumed run makes
the same draws. With only valid pairs kept, a sample is redrawn until it passes and a ``DrawBudget``
stops the run when a defect type needs more than ``max_attempts`` draws per valid pair on average, or
when the first ``give_up_after`` draws all fail; with failing pairs kept, every sample gets at most
``max_attempts`` draws and the least-failing one is written (``first_valid``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from anomalygen.errors import AnomalygenError, OptionError
from anomalygen.generation.validity import CHECKS, Calibration, CheckResult, failures, judge
from anomalygen.types import AnomalySample

MAX_ATTEMPTS = 50  # the filter's cap: draws per valid pair on average (per sample with keep_failing)
GIVE_UP_AFTER = 30  # stop when the first this many draws of a run all fail
UNBOUNDED = 10**9  # draws of one sample when only valid pairs are kept (DrawBudget stops the run)


def check_max_attempts(max_attempts: int, give_up_after: int = GIVE_UP_AFTER) -> None:
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 1000:
        raise OptionError("max_attempts", f"{max_attempts}: give a number from 1 to 1000")
    if isinstance(give_up_after, bool) or not isinstance(give_up_after, int) or not 0 <= give_up_after <= 100000:
        raise OptionError("give_up_after", f"{give_up_after}: give a number of draws from 0 (never) to 100000")


def sub_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of redraw ``attempt`` (>= 1) of sample ``index`` in a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1)[0])


def first_valid(
    sample: AnomalySample,
    redraw: Callable[[int], AnomalySample],
    check: Callable[[AnomalySample], dict[str, CheckResult]],
    max_attempts: int,
    on_draw: Callable[[AnomalySample, list[str]], None] | None = None,
) -> AnomalySample:
    """``sample`` if it passes ``check``, else ``redraw(1)``, ``redraw(2)``, ... up to ``max_attempts``
    in all; when none passes, the one failing the fewest checks (the earliest of equals).
    ``meta["validity"]`` records the attempts, the checks that rejected each and ``passed``.
    ``on_draw`` is called with every draw and its failed checks (it may raise: ``DrawBudget``)."""
    rejected, best = [], None
    for attempt in range(max_attempts):
        if attempt:
            sample = redraw(attempt)
        failed = [result.name for result in failures(check(sample))]
        if on_draw is not None:
            on_draw(sample, failed)
        if not failed:
            break
        rejected.append({"attempt": attempt, "checks": failed})
        if best is None or len(failed) < len(best[1]):
            best = (sample, failed, attempt)
    else:
        sample, failed, attempt = best
    sample.meta["validity"] = {"attempts": len(rejected) + (not failed), "kept": attempt,
                               "rejected": rejected, "passed": not failed}
    return sample


class DrawBudget:
    """``first_valid``'s ``on_draw`` for a run that keeps only valid pairs: it stops the run (an
    ``AnomalygenError`` naming ``what``: method, category) when

    - the first ``give_up_after`` draws all fail (a broken or untrained model, or a method that does
      not suit the category), instead of redrawing for hours (0: never), or
    - a defect type has used up ``per_pair`` draws per valid pair on average: its draws so far exceed
      ``per_pair`` x (its valid pairs so far + the one being drawn).

    Only a failure condition: which draw becomes sample ``i`` does not depend on it."""

    def __init__(self, per_pair: int, give_up_after: int, what: str):
        self.per_pair, self.give_up_after, self.what = per_pair, give_up_after, what
        self.draws: dict[str, int] = {}
        self.valid: dict[str, int] = {}
        self.checks: dict[str, int] = dict.fromkeys(CHECKS, 0)

    def __call__(self, sample: AnomalySample, failed: list[str]) -> None:
        t = sample.defect_type
        self.draws[t] = self.draws.get(t, 0) + 1
        if not failed:
            self.valid[t] = self.valid.get(t, 0) + 1
            return
        for name in failed:
            self.checks[name] += 1
        total = sum(self.draws.values())
        if self.give_up_after and not self.valid and total >= self.give_up_after:
            raise AnomalygenError(
                f"{self.what}: the first {total} draws all failed the validity checks ({describe(self.checks)}); "
                "the model looks broken or untrained, or the method does not suit this category: stopped early "
                "(`give_up_after` sets the number of draws, `keep_failing` keeps failing pairs, without `filter` no check runs)")
        valid = self.valid.get(t, 0)
        if self.draws[t] >= self.per_pair * (valid + 1):
            raise AnomalygenError(
                f"{self.what}/{t}: {self.draws[t]} draws gave {valid} valid pairs ({describe(self.checks)}), more than "
                f"`max_attempts` {self.per_pair} draws per valid pair; what is written stays. Re-run with a higher "
                "`max_attempts` to go on, or add `keep_failing` to keep failing pairs (flagged in the manifest)")


def describe(checks: dict[str, int]) -> str:
    """``{"visible": 3, "size": 0}`` as "rejected by visible 3"."""
    counts = ", ".join(f"{name} {n}" for name, n in checks.items() if n)
    return f"rejected by {counts}" if counts else "no check failed"


def draw_budget(max_attempts: int, keep_failing: bool, give_up_after: int, label: str) -> DrawBudget | None:
    """The ``DrawBudget`` of one generating process; None when failing pairs are kept."""
    return None if keep_failing else DrawBudget(max_attempts, give_up_after, label)


def filtered(samples: Iterable[AnomalySample], generator: Any, goods: list[np.ndarray], calibration: Calibration,
             seed: int, first: int, defect_type: str | None, max_attempts: int,
             budget: DrawBudget | None) -> Iterator[AnomalySample]:
    """``first_valid`` for each of ``samples`` (indices ``first``, ``first + 1``, ...) of ``generator``
    (an ``AnomalyGenerator``, judged by its ``outside_mask``): redraw ``a`` of sample ``i`` is sample
    ``i`` of seed ``sub_seed(seed, i, a)``. With a ``budget`` (only valid pairs) a sample is redrawn
    until it passes or the budget stops the run; without (keep failing), at most ``max_attempts`` times."""
    attempts = max_attempts if budget is None else UNBOUNDED
    for index, sample in enumerate(samples, first):

        def redraw(attempt: int, index: int = index):
            again = generator.generate(goods, 1, seed=sub_seed(seed, index, attempt), start=index, defect_type=defect_type)
            return next(iter(again))

        yield first_valid(sample, redraw, lambda s: judge(calibration, s, goods, generator.outside_mask), attempts, budget)
