"""Rule files -> RuleSet: read, validate and compile `rules/*.yaml`, or say exactly what is wrong.

Files are read in file-name order with ruamel.yaml (YAML 1.2, so `NO` stays a
string; round-trip mode keeps line numbers), validated against `schema` with the
configured group names, and compiled by `engine`. Every problem becomes a
`RuleError` whose message names the file, the line and the key path, e.g.
`rules/10-catalogue.yaml:12: rules[1].when.subject.regex: invalid regex: missing ): (a`.
A bad admin regex is refused here, at load, never discovered when a message hits it.
"""

from __future__ import annotations

import logging
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from gateway.routing.engine import Rule, RuleSet, compile_rule
from gateway.routing.schema import GROUP_NAMES_CONTEXT, RuleFile, RuleSpec, describe_value

log = logging.getLogger(__name__)

RULE_SUFFIX = ".yaml"
# Aliases let a small file expand enormously ("billion laughs"); rule files are
# small, so anything this deep or this large is a mistake, not a rule set.
_MAX_DEPTH = 64
_MAX_NODES = 100_000

Loc = tuple[str | int, ...]


class RuleError(Exception):
    """A rule file is unreadable or invalid.

    The message is ready to show: `file:line: key.path: reason`, one problem per
    line when a file has several. `file`, `line` and `key` describe the first
    (line and key are None when the problem concerns the file as a whole).
    """

    def __init__(
        self,
        file: Path,
        line: int | None,
        key: str | None,
        reason: str,
        *,
        more: Sequence[str] = (),
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.reason = reason
        self.more = tuple(more)
        super().__init__("\n".join([self.format(file, line, key, reason), *self.more]))

    @staticmethod
    def format(file: Path, line: int | None, key: str | None, reason: str) -> str:
        """One problem as `file:line: key: reason` (parts that are unknown left out)."""
        where = f"{file}:{line}" if line is not None else str(file)
        return f"{where}: {key}: {reason}" if key else f"{where}: {reason}"


def rule_files(directory: Path) -> tuple[Path, ...]:
    """The rule files in `directory`, in evaluation (file-name) order; RuleError when the
    directory is missing or a `*.yaml` entry is not a readable file."""
    return _scan(directory)[0]


def _scan(directory: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(rule files, files that look like rules but are ignored)."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        # A typo in rules_dir, or a directory moved away under a running daemon, must
        # not quietly mean "no rules" (and so no spam drops).
        raise RuleError(directory, None, None, "no such directory (daemon.rules_dir)") from None
    except NotADirectoryError:
        raise RuleError(directory, None, None, "not a directory") from None
    except OSError as exc:
        raise RuleError(directory, None, None, f"cannot list: {exc.strerror or exc}") from None
    files: list[Path] = []
    ignored: list[Path] = []
    for path in entries:
        # Hidden names are editor droppings (".#10-x.yaml" locks, swap files).
        if path.name.startswith("."):
            continue
        if path.suffix == RULE_SUFFIX:
            if not path.is_file():  # a dangling symlink, a directory
                raise RuleError(path, None, None, "not a readable file")
            files.append(path)
        elif path.suffix.lower() in (".yaml", ".yml"):
            ignored.append(path)
    return tuple(sorted(files, key=lambda p: p.name)), tuple(sorted(ignored))


def load_rules(directory: Path, group_names: frozenset[str]) -> RuleSet:
    """Load every rule file in `directory` into one RuleSet; an empty directory gives an
    empty one. Raises RuleError for a missing directory and on the first file with
    problems."""
    files, ignored = _scan(directory)
    for path in ignored:
        log.warning("ignoring %s: rule files must be named *%s", path, RULE_SUFFIX)
    rules: list[Rule] = []
    first_seen: dict[str, str] = {}
    for path in files:
        spec, tree = _read(path, group_names)
        items = tree["rules"]
        for index, rule_spec in enumerate(spec.rules):
            line = _item_line(items, index)
            source = f"{path}:{line}"
            _check_unique(path, items, index, rule_spec, first_seen)
            first_seen[rule_spec.name] = source
            rules.append(compile_rule(rule_spec, source))
    return RuleSet(tuple(rules), files)


def _check_unique(
    path: Path, items: Any, index: int, spec: RuleSpec, first_seen: dict[str, str]
) -> None:
    first = first_seen.get(spec.name)
    if first is None:
        return
    line, key = _locate(items, (index, "name"))
    raise RuleError(
        path,
        line,
        f"rules{key}",
        f"duplicate rule name '{spec.name}' (first defined at {first})",
    )


def _read(path: Path, group_names: frozenset[str]) -> tuple[RuleFile, CommentedMap]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RuleError(path, None, None, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise RuleError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and problem.startswith("but "):
            # "expected a single document in the stream" + "but found another document"
            problem = f"{exc.context}, {problem}"
        raise RuleError(path, line, None, f"invalid YAML: {problem}") from None
    except YAMLError as exc:
        raise RuleError(path, None, None, f"invalid YAML: {exc}") from None
    if tree is None:
        # An empty file is more likely a truncated save than a wish to drop every rule;
        # `rules: []` says the latter explicitly.
        raise RuleError(path, None, None, "file is empty (expected a mapping with a 'rules' list)")
    if not isinstance(tree, CommentedMap):
        line = tree.lc.line + 1 if isinstance(tree, CommentedSeq) else 1
        raise RuleError(
            path, line, None, f"expected a mapping with a 'rules' list, got {describe_value(tree)}"
        )
    data = _Plain(path).convert(tree, (), 0)
    try:
        spec = RuleFile.model_validate(data, context={GROUP_NAMES_CONTEXT: group_names})
    except ValidationError as exc:
        raise _validation_error(path, tree, exc) from None
    return spec, tree


class _Plain:
    """ruamel's round-trip tree -> plain dicts, lists and scalars for strict validation."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._nodes = 0

    def convert(self, node: Any, where: Loc, depth: int) -> Any:
        self._nodes += 1
        if depth > _MAX_DEPTH or self._nodes > _MAX_NODES:
            line = _node_line(node)
            raise RuleError(
                self._path, line, _key_path(where) or None, "nested too deeply or too large"
            )
        if isinstance(node, dict):
            plain: dict[str, Any] = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    line = node.lc.key(key)[0] + 1 if isinstance(node, CommentedMap) else None
                    raise RuleError(
                        self._path,
                        line,
                        _key_path(where) or None,
                        f"keys must be strings, got {describe_value(key)}",
                    )
                plain[str(key)] = self.convert(value, (*where, key), depth + 1)
            return plain
        if isinstance(node, list):
            return [self.convert(v, (*where, i), depth + 1) for i, v in enumerate(node)]
        if isinstance(node, bool | ScalarBoolean):
            return bool(node)
        if isinstance(node, str):
            return str(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        return node


def _node_line(node: Any) -> int | None:
    lc = getattr(node, "lc", None)
    return lc.line + 1 if lc is not None and lc.line is not None else None


def _item_line(seq: Any, index: int) -> int | None:
    try:
        return int(seq.lc.item(index)[0]) + 1
    except (AttributeError, KeyError, TypeError):
        return None


def _key_path(loc: Loc) -> str:
    """("rules", 1, "when") -> "rules[1].when"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _locate(tree: Any, loc: Loc) -> tuple[int | None, str]:
    """The line of the deepest node on `loc` that exists, and the key path to show.

    An index into a scalar is dropped from the path: `regex: "(a"` is validated
    as a one-element list, but the admin wrote no list.
    """
    line = _node_line(tree)
    node: Any = tree
    shown: list[str | int] = []
    for depth, part in enumerate(loc):
        if isinstance(part, int):
            if isinstance(node, CommentedSeq) and 0 <= part < len(node):
                line = int(node.lc.item(part)[0]) + 1
                node = node[part]
            elif not isinstance(node, list):
                continue
            shown.append(part)
        elif isinstance(node, CommentedMap) and part in node:
            line = int(node.lc.key(part)[0]) + 1
            node = node[part]
            shown.append(part)
        else:
            # A missing key: point at the mapping that lacks it.
            shown.extend(loc[depth:])
            break
    return line, _key_path(tuple(shown))


_EXPECTED = {
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}


def _reason(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"unknown key (expected one of: {', '.join(allowed)})" if allowed else "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}, got {describe_value(error['input'])}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {describe_value(error['input'])}"
    return str(error["msg"])


def _allowed_keys(loc: Loc) -> list[str]:
    """The keys the schema accepts at `loc`, in declaration order (for "unknown key")."""
    current: Any = RuleFile
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            if typing.get_origin(current) is list:
                current = typing.get_args(current)[0]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        if part not in fields:
            return []
        current = fields[part].annotation
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or name for name, f in current.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to X."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _validation_error(path: Path, tree: CommentedMap, exc: ValidationError) -> RuleError:
    problems: dict[tuple[int, str, str], None] = {}
    for error in exc.errors(include_url=False):
        line, key = _locate(tree, tuple(error["loc"]))
        problems[(line or 0, key, _reason(error))] = None
    # Document order reads best; dict keeps the first of identical problems.
    ordered = sorted(problems, key=lambda p: p[0])
    (line, key, reason), rest = ordered[0], ordered[1:]
    return RuleError(
        path,
        line or None,
        key or None,
        reason,
        more=[RuleError.format(path, ln or None, k or None, r) for ln, k, r in rest],
    )
