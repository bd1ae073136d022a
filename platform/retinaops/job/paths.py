"""Dotted key paths into a job spec: how problems are reported at them, and how values are set at them.

Validators raise `Issues` (problems at paths below them); `error_lines` turns a pydantic ValidationError
into `key.path: expected ..., got ...` lines; `read_yaml` reads a spec file; `set_paths` applies `--set`
and sweep overrides; `flatten` gives the dotted keys of MLflow params. The shape
of a spec is a schema tree: {field: subtree} for sections, {"*": subtree} under free-form mappings
(tracking.tags, sweep.space), None for leaves.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

Tree = dict[str, Any]


class SpecError(ValueError):
    """Every problem of a spec, one per line, each line prefixed by the file (or other source)."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


class Issue(NamedTuple):
    """One problem at `path`, relative to where it was raised (a validator's field or section)."""

    path: tuple[str | int, ...]
    message: str
    suggestion: str | None = None
    """For an unknown key: the nearest known sibling key, if any."""
    unknown: bool = False


class Issues(ValueError):
    """Raised by validators to report several problems, each at its own path."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("; ".join(format_issue((), i) for i in issues))


def raise_issues(issues: list[Issue]) -> None:
    if issues:
        raise Issues(issues)


class Section(BaseModel):
    """A spec section: unknown keys are errors, values are not coerced, and it never changes."""

    # strict: YAML already gives typed values, so "10" for an integer is a mistake, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    return next(iter(difflib.get_close_matches(word, list(candidates), n=1)), None)


def schema_tree(annotation: Any, replace: Mapping[str, Tree] | None = None) -> Any:
    """The schema tree of a pydantic model (or type); `replace` swaps the subtrees of top-level fields."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        tree = {name: schema_tree(f.annotation) for name, f in annotation.model_fields.items()}
        return tree | dict(replace or {})
    if get_origin(annotation) is dict:
        return {"*": schema_tree(args[1])}
    return next((sub for a in args if isinstance(sub := schema_tree(a), dict)), None)  # Optional, list


def leaf_paths(tree: Tree, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves, not entering free-form mappings."""
    out = []
    for key, sub in tree.items():
        if isinstance(sub, dict) and "*" not in sub:
            out += leaf_paths(sub, f"{prefix}{key}.")
        elif sub is None:
            out.append(prefix + key)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds ({} for an empty file); SpecError names file:line:col of a syntax error."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SpecError(source, [exc.strerror or str(exc)]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(
            source, [f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise SpecError(
            where, [f"YAML syntax error: {exc.context or ''} {exc.problem or ''}".strip()]
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"YAML error: {exc}"]) from None
    if not isinstance(data, dict | None):
        raise SpecError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    return data or {}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.01}} -> {"train.lr": 0.01}; empty mappings stay as leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def parse_overrides(items: Iterable[str], source: str = "--set") -> dict[str, Any]:
    """`["train.epochs=3", "model.anchor_scales=[1.0, 1.5]"]` -> {"train.epochs": 3, ...}."""
    parsed: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key.path=value")
            continue
        try:
            parsed[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: the value is not YAML: {str(exc).splitlines()[0]}")
    if problems:
        raise SpecError(source, problems)
    return parsed


def set_paths(data: Mapping[str, Any], values: Mapping[str, Any], tree: Tree, source: str) -> dict[str, Any]:
    """A deep copy of data with each dotted path of `values` set; SpecError for a path not in tree.

    Below a free-form mapping the rest of the path is one key: `sweep.space.model.focal_gamma` sets the
    space entry `model.focal_gamma`.
    """
    out = copy.deepcopy(dict(data))
    problems = []
    for dotted, value in values.items():
        if hasattr(value, "item") and type(value).__module__ == "numpy":
            value = value.item()  # Tune samples numpy scalars; the spec is strict about int vs float
        parts, node, target = dotted.split("."), tree, out
        for i, part in enumerate(parts):
            if isinstance(node, dict) and "*" in node:
                key, node, last = ".".join(parts[i:]), node["*"], True
            elif isinstance(node, dict) and part in node:
                key, node, last = part, node[part], i == len(parts) - 1
            else:
                near = nearest(part, list(node or {}))
                hint = f" (did you mean {'.'.join([*parts[:i], near, *parts[i + 1 :]])!r}?)" if near else ""
                problems.append(f"unknown key {dotted!r}{hint}")
                break
            if last:
                target[key] = value
                break
            if not isinstance(target.get(key), dict):
                target[key] = {}  # a section the file left out, or left empty (null)
            target = target[key]
    if problems:
        raise SpecError(source, problems)
    return out


def dotted(loc: Iterable[str | int]) -> str:
    """("train", "milestones", 1) -> "train.milestones[1]"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_issue(loc: tuple[str | int, ...], issue: Issue) -> str:
    path = dotted(loc + issue.path)
    if issue.unknown:
        near = dotted(loc + issue.path[:-1] + (issue.suggestion,)) if issue.suggestion else None
        return f"unknown key {path!r}" + (f" (did you mean {near!r}?)" if near else "")
    return f"{path}: {issue.message}" if path else issue.message


def _siblings(tree: Tree, loc: tuple[str | int, ...]) -> list[str]:
    node: Any = tree
    for part in (p for p in loc[:-1] if not isinstance(p, int)):
        node = node.get("*") if isinstance(node, dict) and "*" in node else (node or {}).get(part)
    return list(node) if isinstance(node, dict) else []


_EXPECTED = {"int": "an integer", "float": "a number", "finite": "a finite number", "bool": "true or false"}
_EXPECTED |= {"string": "a string", "list": "a list", "dict": "a mapping", "model": "a mapping"}
_YAML11_FLOAT = re.compile(r"[-+]?[0-9]+e[-+]?[0-9]+", re.IGNORECASE)
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def error_lines(
    exc: ValidationError, tree: Tree, missing_hints: Mapping[str, str] | None = None
) -> list[str]:
    """One "key.path: message" line per error of a pydantic ValidationError; tree suggests unknown keys."""
    lines = []
    for err in exc.errors(include_url=False):
        loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx", {})
        got = repr(err.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        if kind == "value_error" and isinstance(ctx.get("error"), Issues):
            lines += [format_issue(loc, issue) for issue in ctx["error"].issues]
            continue
        if kind == "extra_forbidden":
            near = nearest(str(loc[-1]), _siblings(tree, loc))
            lines.append(format_issue(loc[:-1], Issue(loc[-1:], "", near, unknown=True)))
            continue
        head = kind.split("_")[0]
        if head in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float", "finite_number")):
            message = f"expected {_EXPECTED[head]}, got {got}"
            if (
                head == "float"
                and isinstance(err.get("input"), str)
                and _YAML11_FLOAT.fullmatch(err["input"])
            ):
                message += " (YAML reads 1e-4 as a string: write 1.0e-4)"
        elif kind in _BOUNDS:
            message = f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {got}"
        elif kind == "literal_error":
            allowed = re.findall(r"'([^']*)'", ctx["expected"])
            message = f"expected one of {'|'.join(allowed)}, got {got}"
        elif kind == "missing":
            hint = (missing_hints or {}).get(dotted(loc))
            message = "required" + (f": {hint}" if hint else "")
        elif kind == "value_error":
            message = str(ctx.get("error", err["msg"]))
        else:
            message = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got}"
        lines.append(f"{dotted(loc)}: {message}" if loc else message)
    return lines
