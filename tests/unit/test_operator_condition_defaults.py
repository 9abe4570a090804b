"""A condition set without a message or generation: the documented empty message and generation 0."""

from __future__ import annotations

import re

from esper_operator.status import set_condition


def test_a_condition_without_message_or_generation() -> None:
    [condition] = set_condition([], "Valid", True, "Validated")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", condition.pop("lastTransitionTime"))
    assert condition == {
        "type": "Valid",
        "status": "True",
        "reason": "Validated",
        "message": "",
        "observedGeneration": 0,
    }
