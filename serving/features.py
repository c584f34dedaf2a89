"""Feature-level input schemas: what each column of an input may hold, declared in the
manifest (`features:` on an input), checked on `/predict` rows.

```yaml
inputs:
  - name: input
    datatype: FP32
    shape: [-1, 3]
    features:                 # one per column, in column order
      - {name: amount, type: number, min: 0, max: 100000}
      - {name: hour, type: integer, min: 0, max: 23}
      - {name: channel, type: integer, enum: [0, 1, 2]}
  - name: country
    datatype: BYTES
    shape: [-1]
    features: [{name: country, type: string, pattern: "[A-Z]{2}"}]
```
A `[-1, N]` input lists N features, a `[-1]` input one. A `/predict` row may then name
the features themselves (`{"amount": 12.5, "hour": 3, "channel": 1, "country": "DE"}`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollguard.serving.errors import InvalidInput

FeatureType = Literal["number", "integer", "string", "boolean"]
_NUMERIC = {"number", "integer"}
_MAX_SHOWN = 40  # characters of a client's value quoted back in an error


class Feature(BaseModel):
    """One column's schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    type: FeatureType = "number"
    min: float | None = None
    max: float | None = None
    enum: list[str | int | float | bool] | None = Field(default=None, min_length=1)
    pattern: str | None = None  # a full match is required (re.fullmatch)

    @model_validator(mode="after")
    def _consistent(self) -> Feature:
        numeric = self.type in _NUMERIC
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"feature {self.name!r}: min/max apply to number and integer only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} is above max {self.max}")
        if self.pattern is not None:
            if self.type != "string":
                raise ValueError(f"feature {self.name!r}: pattern applies to strings only")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"feature {self.name!r}: pattern is not a regex: {exc}") from None
        for value in self.enum or ():
            if _type_error(self.type, value) is not None:
                raise ValueError(
                    f"feature {self.name!r}: enum value {value!r} is not a {self.type}"
                )
        return self

    @cached_property
    def _regex(self) -> re.Pattern[str] | None:
        return re.compile(self.pattern) if self.pattern is not None else None

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this feature, None when it fits."""
        wrong = _type_error(self.type, value)
        if wrong is not None:
            return wrong
        if self.min is not None and value < self.min:
            return f"{_shown(value)} is below the minimum {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{_shown(value)} is above the maximum {self.max:g}"
        if self.enum is not None and not any(
            value == e and isinstance(value, bool) == isinstance(e, bool) for e in self.enum
        ):
            return f"{_shown(value)} is not one of {self.enum}"
        regex = self._regex
        if regex is not None and regex.fullmatch(value) is None:
            return f"{_shown(value)} does not match the pattern {self.pattern!r}"
        return None


def _type_error(kind: str, value: Any) -> str | None:
    if kind == "boolean":
        return None if isinstance(value, bool) else f"{_shown(value)} is not a boolean"
    if kind == "string":
        return None if isinstance(value, str) else f"{_shown(value)} is not a string"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{_shown(value)} is not a number"
    if not math.isfinite(value):
        return f"{_shown(value)} is not a finite number"
    if kind == "integer" and not (isinstance(value, int) or value.is_integer()):
        return f"{_shown(value)} is not an integer"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def check_declaration(features: Sequence[Feature], datatype: str, shape: Sequence[int]) -> None:
    """ValueError unless `features` fit the input they are declared on."""
    if len(shape) == 1:
        columns = 1
    elif len(shape) == 2 and shape[1] != -1:
        columns = shape[1]
    else:
        raise ValueError(f"features fit inputs of shape [-1] or [-1, N], not {list(shape)}")
    if len(features) != columns:
        raise ValueError(f"{len(features)} features declared for {columns} column(s)")
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        raise ValueError(f"feature names repeat: {names}")
    for f in features:
        if (f.type == "string") != (datatype == "BYTES"):
            raise ValueError(f"feature {f.name!r} is a {f.type}; the input is {datatype}")


def check_row(name: str, features: Sequence[Feature], values: Any, row: int) -> None:
    """InvalidInput naming the row and the feature when `values` (one input's row) breaks
    its schema. A [-1] input's row is the value itself; a [-1, N] input's a list of N."""
    if len(features) == 1 and not isinstance(values, list):
        values = [values]
    if not isinstance(values, list) or len(values) != len(features):
        raise InvalidInput(f"row {row}: input {name!r} takes {len(features)} values, one per "
                           f"feature {[f.name for f in features]}")  # fmt: skip
    for feature, value in zip(features, values, strict=True):
        wrong = feature.problem(value)
        if wrong is not None:
            raise InvalidInput(f"row {row}: feature {feature.name!r}: {wrong}")
