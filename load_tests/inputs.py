"""What a load test sends: the user's own model, inputs file and stickiness key.

The locustfile and the scenarios share these, from options or the environment:

| option | environment | default |
|---|---|---|
| `--model NAME` | `ROLLGUARD_LOAD_MODEL` | `fraud` (the demo model) |
| `--inputs FILE` | `ROLLGUARD_LOAD_INPUTS` | the demo's evaluation rows |
| `--input-name NAME` | `ROLLGUARD_LOAD_INPUT_NAME` | `input` (for .npy/.npz/.csv rows) |
| `--key header:NAME` / `cookie:NAME` / `none` | `ROLLGUARD_LOAD_KEY` | `header:x-user-id` |

Inputs files, by suffix:
- `.jsonl`: one V2 infer body per line, sent as it is; a `"label"` key beside `"inputs"`
  is that request's ground truth (taken out before sending, posted as feedback).
- `.json`: a list of such bodies.
- `.npy`: a 2-D array, one FP32 row per request, named `--input-name`.
- `.npz`: arrays `x` (rows) and optionally `y` (labels).
- `.csv`: a header line, then numeric rows; a column named `label` is the label.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.loadgen import v2_bodies
from rollguard.proxy.routing import KeySource

DEFAULT_MODEL = "fraud"
DEFAULT_KEY = "header:x-user-id"
_DEFAULT_KEY_SOURCE = KeySource("header", "x-user-id")
ENV = {
    "model": "ROLLGUARD_LOAD_MODEL",
    "inputs": "ROLLGUARD_LOAD_INPUTS",
    "input_name": "ROLLGUARD_LOAD_INPUT_NAME",
    "key": "ROLLGUARD_LOAD_KEY",
}


Label = int | float | str


class InputsError(ValueError):
    """An inputs file or option that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Inputs:
    """Request bodies (serialised V2 JSON) and, when known, each one's label."""

    bodies: list[bytes]
    labels: list[Label] | None


@dataclass(frozen=True, slots=True)
class Target:
    """The model to load, what to send it, and where the stickiness key goes."""

    model: str = DEFAULT_MODEL
    inputs: Path | None = None  # None: the demo's evaluation rows
    input_name: str = "input"
    key: KeySource | None = _DEFAULT_KEY_SOURCE  # None: send no key

    def headers(self, user: str) -> dict[str, str]:
        """The header carrying `user` as the stickiness key (none when there is no key)."""
        if self.key is None:
            return {}
        if self.key.kind == "header":
            return {self.key.name: user}
        return {"Cookie": f"{self.key.name}={user}"}

    def read(self) -> Inputs:
        if self.inputs is not None:
            return read_inputs(self.inputs, self.input_name)
        from rollguard.serving.demo.build import load_eval_data

        x, y = load_eval_data()
        return Inputs(v2_bodies(np.asarray(x, np.float32), self.input_name), _labels(y))


def parse_key(text: str) -> KeySource | None:
    """`header:NAME`, `cookie:NAME`, or `none`; InputsError naming the forms otherwise."""
    if text.strip().lower() == "none":
        return None
    try:
        return KeySource.parse(text.strip())
    except ValueError as exc:
        raise InputsError(f"stickiness key {text!r}: {exc}, or 'none'") from None


def target_from(
    options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Target:
    """A Target from options (None or missing: not given), else the environment, else defaults."""
    options = options or {}
    environ = os.environ if environ is None else environ

    def given(name: str) -> str | None:
        value = options.get(name)
        if value is None or value == "":
            value = environ.get(ENV[name]) or None
        return None if value is None else str(value)

    inputs = given("inputs")
    return Target(
        model=given("model") or DEFAULT_MODEL,
        inputs=None if inputs is None else Path(inputs),
        input_name=given("input_name") or "input",
        key=parse_key(given("key") or DEFAULT_KEY),
    )


def read_inputs(path: Path, input_name: str = "input") -> Inputs:
    """The requests in an inputs file (see the module docstring for the formats)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            docs = [(i, _json(text, path, i)) for i, text in enumerate(lines, 1) if text.strip()]
            found = _from_docs(docs, path)
        elif suffix == ".json":
            doc = _json(path.read_text(encoding="utf-8"), path, None)
            if not isinstance(doc, list):
                raise InputsError(f"{path}: expected a JSON list of V2 infer bodies")
            found = _from_docs(list(enumerate(doc, 1)), path)
        elif suffix == ".npy":
            found = _from_arrays(np.load(path, allow_pickle=False), None, path, input_name)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive:
                    raise InputsError(f"{path}: needs an array named 'x' (and optionally 'y')")
                labels = archive["y"] if "y" in archive.files else None
                found = _from_arrays(archive["x"], labels, path, input_name)
        elif suffix == ".csv":
            found = _from_csv(path, input_name)
        else:
            raise InputsError(
                f"{path}: unknown inputs format {suffix or '(no suffix)'!r}; "
                "use .jsonl, .json, .npy, .npz or .csv"
            )
    except OSError as exc:
        raise InputsError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        if isinstance(exc, InputsError):
            raise
        raise InputsError(f"{path}: {exc}") from None
    if not found.bodies:
        raise InputsError(f"{path}: holds no requests")
    return found


def _json(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}:{line}" if line is not None else str(path)
        raise InputsError(f"{where}: not valid JSON: {exc.msg}") from None


def _from_docs(docs: Sequence[tuple[int, Any]], path: Path) -> Inputs:
    bodies, labels = [], []
    for line, doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
            raise InputsError(f"{path}:{line}: expected a V2 infer body with an 'inputs' list")
        doc = dict(doc)
        labels.append(doc.pop("label", None))
        bodies.append(json.dumps(doc).encode())
    if all(label is None for label in labels):
        return Inputs(bodies, None)
    if any(label is None for label in labels):
        missing = next(line for (line, _), label in zip(docs, labels, strict=True) if label is None)
        raise InputsError(f"{path}:{missing}: has no 'label' while other lines have one")
    return Inputs(bodies, labels)


def _from_arrays(x: np.ndarray, y: np.ndarray | None, path: Path, name: str) -> Inputs:
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number):
        raise InputsError(f"{path}: expected a 2-D numeric array of rows, got {x.dtype} {x.shape}")
    if y is not None and len(y) != len(x):
        raise InputsError(f"{path}: 'y' has {len(y)} labels for {len(x)} rows")
    return Inputs(v2_bodies(x, name), None if y is None else _labels(y))


def _from_csv(path: Path, name: str) -> Inputs:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise InputsError(f"{path}: expected a header line and at least one row")
    header = [h.strip() for h in rows[0]]
    label_at = header.index("label") if "label" in header else None
    features, labels = [], []
    for line, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise InputsError(f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
        try:
            numbers = [float(v) for v in row]
        except ValueError:
            raise InputsError(f"{path}:{line}: every column must be a number") from None
        if label_at is not None:
            labels.append(numbers.pop(label_at))
        features.append(numbers)
    return Inputs(v2_bodies(np.asarray(features, np.float32), name), _labels(labels) or None)


def _labels(values: Any) -> list[Label]:
    """Labels as JSON sends them: whole numbers as ints (class ids), others unchanged."""
    found: list[Label] = []
    for value in np.asarray(values).tolist():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        found.append(value)
    return found
