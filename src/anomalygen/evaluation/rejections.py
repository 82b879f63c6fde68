"""How often the validity filter redrew: statistics of the ``meta["validity"]`` a filtered run wrote
into its manifest (``generation.redraw.first_valid``), for the evaluation report."""

from __future__ import annotations

from anomalygen.generation.validity import CHECKS


def rejection_rates(lines: list[dict]) -> dict[str, dict]:
    """Per defect type (and ``"all"``), from manifest lines written with the filter: samples, the share
    whose first draw was rejected (``rejected_first``), the share still failing after every draw
    (``kept_failing``) and the rejected draws per check. Types written without the filter are absent."""
    rates: dict[str, dict] = {}
    for line in lines:
        validity = (line.get("meta") or {}).get("validity")
        if validity is None:
            continue
        for key in (line["defect_type"], "all"):
            entry = rates.setdefault(key, {"samples": 0, "rejected_first": 0, "kept_failing": 0,
                                           "rejected_draws": dict.fromkeys(CHECKS, 0)})
            entry["samples"] += 1
            entry["rejected_first"] += bool(validity["rejected"]) and validity["rejected"][0]["attempt"] == 0
            entry["kept_failing"] += not validity["passed"]
            for draw in validity["rejected"]:
                for check in draw["checks"]:
                    entry["rejected_draws"][check] += 1
    for entry in rates.values():
        entry["rejected_first"] /= entry["samples"]
        entry["kept_failing"] /= entry["samples"]
    return dict(sorted(rates.items(), key=lambda item: (item[0] == "all", item[0])))
