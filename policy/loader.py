"""Reading Rollout files: YAML with line tracking, pydantic validation, file:line errors.

Every failure becomes one PolicyInvalid whose message has one line per problem,
earliest first, each `<file>:<line>: <dotted.field.path>: <reason>`; the exception's
`line` is the first problem's. The watcher and `rollguard policy check` share this code.

Policy files may come from people who should not be able to stall the gateway, so
parsing is bounded: at most MAX_POLICY_BYTES, no anchors or aliases (a 555-byte alias
bomb expands to billions of nodes), at most MAX_DEPTH levels of nesting (the composer
recurses; a deep document would raise RecursionError) and MAX_NODES values (pure-Python
YAML takes seconds for a long flat list), and every other failure of the
YAML library becomes this file's PolicyInvalid rather than escaping.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rollguard.policy.errors import PolicyInvalid
from rollguard.policy.schema import Rollout

MAX_POLICY_BYTES = 1 << 20  # a policy is a page of YAML; refuse anything absurd early
MAX_DEPTH = 32  # a Rollout nests 5 levels deep; far more is not a policy
MAX_NODES = 10_000  # a long policy has a few hundred values; parsing time stays bounded
_MAX_REPORTED = 10
_Loc = tuple[int | str, ...]


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases and stops at MAX_DEPTH or MAX_NODES."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            raise _refused("an alias (*name)", event)
        if isinstance(event, ScalarEvent | CollectionStartEvent) and event.anchor is not None:
            raise _refused("an anchor (&name)", event)
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _limit(f"nested deeper than {MAX_DEPTH} levels", event)
            if self._nodes > MAX_NODES:
                raise _limit(f"more than {MAX_NODES} values; a policy is far shorter", event)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _refused(what: str, event: yaml.Event) -> ComposerError:
    return _limit(f"{what}: anchors and aliases are not allowed in policies", event)


def _limit(reason: str, event: yaml.Event) -> ComposerError:
    return ComposerError(None, None, reason, event.start_mark)  # type: ignore[arg-type]


def load_rollout(path: Path, *, webhook_hosts: Sequence[str] = ()) -> Rollout:
    """Read and validate one Rollout file; PolicyInvalid names file, line and field.

    `webhook_hosts`: the operator's allow-list for webhook hosts (empty allows none)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyInvalid(f"{path}: cannot read: {exc.strerror or exc}", file=str(path)) from exc
    return parse_rollout_bytes(data, str(path), webhook_hosts=webhook_hosts)


def parse_rollout_bytes(data: bytes, source: str, *, webhook_hosts: Sequence[str] = ()) -> Rollout:
    """parse_rollout for raw file contents: enforces the size cap and UTF-8."""
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyInvalid(
            f"{source}:1: (document): larger than {MAX_POLICY_BYTES} bytes", file=source, line=1
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyInvalid(
            f"{source}:{line}: (document): not UTF-8 text", file=source, line=line
        ) from exc
    return parse_rollout(text, source, webhook_hosts=webhook_hosts)


def parse_rollout(text: str, source: str, *, webhook_hosts: Sequence[str] = ()) -> Rollout:
    """Parse and validate the text of one Rollout document; `source` names it in errors.

    `webhook_hosts`: the operator's allow-list for webhook hosts (empty allows none)."""
    root = _compose(text, source)
    if root is None:
        raise PolicyInvalid(
            f"{source}:1: (document): empty; expected a Rollout", file=source, line=1
        )
    problems = sorted(_duplicate_keys(root, ()))
    if not problems:
        loader = yaml.SafeLoader("")
        try:
            document: Any = loader.construct_document(root)
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc, source) from exc
        except (yaml.YAMLError, ValueError, OverflowError) as exc:  # e.g. a 5000-digit int
            raise PolicyInvalid(f"{source}:1: YAML: {exc}", file=source, line=1) from exc
        finally:
            loader.dispose()
        context = {"webhook_hosts": tuple(webhook_hosts)}
        try:
            return Rollout.model_validate(document, context=context)
        except ValidationError as exc:
            problems = sorted(_describe(err, root) for err in exc.errors())
    lines = [f"{source}:{line}: {path}: {reason}" for line, path, reason in problems]
    if len(lines) > _MAX_REPORTED:
        lines = [*lines[:_MAX_REPORTED], f"... and {len(lines) - _MAX_REPORTED} more"]
    raise PolicyInvalid("\n".join(lines), file=source, line=problems[0][0])


def check_files(
    paths: Iterable[Path | str], *, webhook_hosts: Sequence[str] = ()
) -> list[tuple[str, str | None]]:
    """`rollguard policy check`: (file, None) when valid, else (file, error message)."""
    results: list[tuple[str, str | None]] = []
    for p in paths:
        try:
            load_rollout(Path(p), webhook_hosts=webhook_hosts)
        except PolicyInvalid as exc:
            results.append((str(p), str(exc)))
        else:
            results.append((str(p), None))
    return results


def find_line(text: str, dotted: str) -> int | None:
    """The 1-based line of the field `a.b.0.c` in a YAML text, or None if it is absent."""
    loader = _PolicyLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()
    if root is None:
        return None
    loc: _Loc = tuple(int(s) if s.isdigit() else s for s in dotted.split("."))
    line, found = _locate(root, loc)
    return line if found == loc else None


def _compose(text: str, source: str) -> Node | None:
    loader = _PolicyLoader(text)
    try:
        # get_single_node raises a ComposerError marked at a second document.
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, source) from exc
    except yaml.YAMLError as exc:  # unmarked reader errors (control characters ...)
        raise PolicyInvalid(f"{source}:1: YAML: {exc}", file=source, line=1) from exc
    finally:
        loader.dispose()


def _syntax_error(exc: yaml.MarkedYAMLError, source: str) -> PolicyInvalid:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    reason = exc.problem or exc.context or "invalid YAML"
    if exc.context and exc.problem and "single document" in exc.context:
        reason = "a second YAML document; a file holds exactly one Rollout"
    elif exc.context and exc.problem:
        reason = f"{exc.problem} ({exc.context})"
    return PolicyInvalid(f"{source}:{line}: YAML: {reason}", file=source, line=line)


def _duplicate_keys(node: Node, loc: _Loc) -> Iterator[tuple[int, str, str]]:
    """PyYAML keeps the last of two equal keys silently; in a policy that hides a typo."""
    if isinstance(node, MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if key.value in seen:
                where = _dotted((*loc, key.value))
                yield key.start_mark.line + 1, where, f"duplicate key {key.value!r}"
            seen.add(key.value)
            yield from _duplicate_keys(value, (*loc, key.value))
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, i))


def _locate(root: Node, loc: _Loc) -> tuple[int, _Loc]:
    """Line of the node at `loc` (or its nearest ancestor) and how much of `loc` was found.

    A mapping entry is reported at its key's line, so a nested block points at `spec:`
    rather than at its first child. Segments pydantic appends past a scalar (union
    member tags such as 'float') are not field names and are dropped.
    """
    node, line = root, root.start_mark.line + 1
    found: _Loc = ()
    for seg in loc:
        if isinstance(node, MappingNode) and isinstance(seg, str):
            entry = next(
                ((k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == seg),
                None,
            )
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, SequenceNode) and isinstance(seg, int) and seg < len(node.value):
            node = node.value[seg]
            line = node.start_mark.line + 1
        else:
            break
        found = (*found, seg)
    return line, found


# What an unknown key may look like to be named in an error. Another key is described,
# not quoted: a policy file symlinked to any file the gateway can read (/etc/shadow)
# had every line echoed as an unknown field, into the log and /admin/rollouts.
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _describe(err: Any, root: Node) -> tuple[int, str, str]:
    loc: _Loc = tuple(err["loc"])
    line, found = _locate(root, loc)
    if err["type"] == "extra_forbidden" and not _FIELD_NAME.fullmatch(str(loc[-1])):
        loc = (*loc[:-1], f"<a key of {len(str(loc[-1]))} characters>")
    kind, value = err["type"], err.get("input")
    # An absent or unknown field is named in full; its line is its parent's.
    path = _dotted(loc if kind in ("missing", "extra_forbidden") else found)
    reason = str(err["msg"]).removeprefix("Value error, ")
    if kind == "missing":
        reason = "required field is missing"
    elif kind == "extra_forbidden":
        reason = f"unknown field {loc[-1]!r}" + _suggestion(loc)
        if str(loc[-1]).startswith("<a key of "):
            reason = f"unknown field: {str(loc[-1])[1:-1]} that is no field name"
    elif kind in ("model_type", "dict_type"):
        reason = f"expected a mapping, got {_yaml_kind(value)}"
    elif kind == "string_type" and isinstance(value, int | float) and not isinstance(value, bool):
        text = _scalar_text(root, found) or str(value)
        reason = f'expected a string, got the number {text}; quote it: "{text}"'
    elif kind != "value_error" and _is_scalar(value):
        reason = f"{reason} (got {_shown(value)})"
    return line, path, reason


def _suggestion(loc: _Loc) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" ({hint}allowed: {', '.join(allowed)})"


def _model_at(loc: _Loc) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at `loc`."""
    model: type[BaseModel] = Rollout
    for seg in loc:
        if isinstance(seg, int):
            continue  # list items: the element model was taken from the list annotation
        field = model.model_fields.get(seg)
        inner = _inner_model(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _inner_model(arg)) is not None:
                return found
    return None


def _scalar_text(root: Node, loc: _Loc) -> str | None:
    node: Node = root
    for seg in loc:
        if isinstance(node, MappingNode):
            node = next(v for k, v in node.value if isinstance(k, ScalarNode) and k.value == seg)
        elif isinstance(node, SequenceNode) and isinstance(seg, int):
            node = node.value[seg]
    return node.value if isinstance(node, ScalarNode) else None


def _yaml_kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    return "nothing" if value is None else _shown(value)


_SHOWN_CHARS = 24  # a value longer than this is described, not quoted


def _shown(value: object) -> str:
    """A value as an error quotes it: short ones whole (a typo is seen at once), longer
    text by its length. A policy file symlinked to a secret (a token, a key file) must not
    have its content quoted into the log and /admin/rollouts."""
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return f"a text of {len(value)} characters"
    return repr(value)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _dotted(loc: _Loc) -> str:
    return ".".join(str(s) for s in loc) if loc else "(document)"
