"""The program file: pydantic models for its public keys, loading from YAML/JSON, and references.

A reference is a string value in a module's ``inputs`` (or the program's ``outputs``):
``$inputs.NAME`` (a program input), ``$MODULE.FIELD`` (one field of a module's output), ``$MODULE``
(the whole output mapping). ``$$`` escapes a leading ``$``. References may sit inside lists and
mappings; anything else is a literal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dspex_celery.collector import without_collection
from dspex_celery.errors import ProgramError, beyond_parser_limits, not_utf8

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
USES_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
#: ``package.module:function``, or the name of a method of the module's instance (``uses`` a class).
COMPENSATE_PATTERN = r"^([A-Za-z_][\w.]*:[A-Za-z_][\w.]*|[A-Za-z][A-Za-z0-9_]*)$"
RESERVED_NAMES = frozenset({"inputs"})

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetryPolicy(_Frozen):
    """``retry:`` — how often and how patiently a module is retried on transient errors."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)
    jitter: bool = True
    on: tuple[Annotated[str, Field(pattern=USES_PATTERN)], ...] = ()
    timeouts: bool = True  # retry a module that ran past its timeout_s (false: a timeout fails it)


class BreakerPolicy(_Frozen):
    """``circuit_breaker:`` — open after ``failures`` consecutive failures for ``reset_s`` seconds;
    errors of the classes in ``ignore`` (the call's data, not its service: ``builtins:ValueError``)
    do not count."""

    failures: int = Field(default=5, ge=1)
    reset_s: float = Field(default=30.0, gt=0)
    enabled: bool = True
    ignore: tuple[Annotated[str, Field(pattern=USES_PATTERN)], ...] | None = None  # None: every error counts


class ModuleDefaults(_Frozen):
    """Program ``defaults:`` applied to every module that does not set the key itself."""

    retry: RetryPolicy | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    circuit_breaker: BreakerPolicy | None = None
    resource: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None


class Threshold(_Frozen):
    """``failure_tolerance: {threshold: N}`` — tolerant up to N failed modules, then strict."""

    threshold: int = Field(ge=0)


FailureTolerance = Literal["strict", "tolerant"] | Threshold


class DspySettings(_Frozen):
    """``dspy:`` — factories (``package.module:callable``) the worker calls to build the LM and adapter
    that DSPy modules run with (inside ``dspy.context``)."""

    lm: Annotated[str, Field(pattern=USES_PATTERN)] | None = None
    adapter: Annotated[str, Field(pattern=USES_PATTERN)] | None = None


class ModuleSpec(_Frozen):
    """One module of the program: what to call, with which inputs, on which resource class."""

    uses: Annotated[str, Field(pattern=USES_PATTERN)]
    inputs: dict[str, Any] | None = None
    depends_on: tuple[Name, ...] = ()
    resource: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    state: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryPolicy | None = None
    circuit_breaker: BreakerPolicy | None = None
    dspy: DspySettings | None = None
    #: A backup attempt on another worker after this many seconds (first to finish wins).
    backup_after_s: float | None = Field(default=None, gt=0)
    #: ``false``: never a backup attempt (the module has side effects); unset: on.
    backup: bool | None = None
    #: ``package.module:function`` (or a method name of the module's instance) called with ``inputs=`` and
    #: ``output=`` to undo this module's side effects when the execution fails or is cancelled (saga.py).
    compensate: Annotated[str, Field(pattern=COMPENSATE_PATTERN)] | None = None


class ProgramSpec(_Frozen):
    """A whole program file."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.-]*$")]
    inputs: tuple[Name, ...] = ()
    modules: dict[str, ModuleSpec]
    outputs: dict[str, Any] | None = None
    defaults: ModuleDefaults = ModuleDefaults()
    failure_tolerance: FailureTolerance = "strict"
    description: str | None = None
    dspy: DspySettings | None = None
    #: ``learned``: the optimizer's timeouts fill in where no ``timeout_s`` is set; ``program``: only
    #: the program's own (unset: the ``learned_timeouts`` setting decides). Not part of the fingerprint.
    timeouts: Literal["learned", "program"] | None = None

    @field_validator("modules")
    @classmethod
    def _modules_not_empty(cls, modules: dict[str, ModuleSpec]) -> dict[str, ModuleSpec]:
        if not modules:
            raise ValueError("a program needs at least one module")
        return modules

    def to_dict(self) -> dict[str, Any]:
        """The program as a plain mapping, in program-file keys."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def field_values(modules: Iterable[ModuleSpec], field: str) -> Iterator[Any]:
    """Every value of the modules' ``field`` mappings (``inputs`` or ``with_``), chained without a Python
    loop (a 1000-module program has thousands)."""
    return chain.from_iterable(map(dict.values, filter(None, map(attrgetter(field), modules))))


# --- references ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference found in a value: ``source`` is ``"inputs"`` or a module name."""

    source: str
    field: str | None

    @property
    def is_input(self) -> bool:
        return self.source == "inputs"

    def __str__(self) -> str:
        return f"${self.source}" + (f".{self.field}" if self.field is not None else "")


def parse_ref(text: str) -> Ref | None:
    """The reference a string stands for, or None when it is a literal."""
    if not text.startswith("$") or text.startswith("$$"):
        return None
    source, _, field = text[1:].partition(".")
    return Ref(source, field or None)


def iter_refs(value: Any) -> Iterator[Ref]:
    """Every reference inside a value (strings, lists and mappings, recursively)."""
    if isinstance(value, str):
        ref = parse_ref(value)
        if ref is not None:
            yield ref
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_refs(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_refs(item)


def unescape(text: str) -> str:
    """A literal string as the module sees it (``$$x`` becomes ``$x``)."""
    return text[1:] if text.startswith("$$") else text


# --- literal values --------------------------------------------------------------------------------

#: What a literal may be made of: values travel to workers as JSON.
_JSON_ATOMS = (str, int, float, bool, type(None))
#: The same types exactly (no subclasses), for ``type(value) in ATOM_TYPES`` checks: immutable, and holding no
#: reference but a string's own.
ATOM_TYPES = frozenset(_JSON_ATOMS)


def is_json(value: Any) -> bool:
    """True when ``value`` is made only of JSON types (lists may be tuples; mapping keys strings)."""
    if isinstance(value, _JSON_ATOMS):
        return True
    if isinstance(value, list | tuple):
        return all(map(is_json, value))
    if isinstance(value, dict):
        return all(type(key) is str for key in value) and all(map(is_json, value.values()))
    return False


def non_json_problems(value: Any, where: str) -> list[str]:
    """One line per value inside ``value`` that JSON cannot carry, naming where it sits."""
    if isinstance(value, _JSON_ATOMS):
        return []
    if isinstance(value, list | tuple):
        return [line for index, item in enumerate(value) for line in non_json_problems(item, f"{where}[{index}]")]
    if isinstance(value, dict):
        lines = [f"{where}: key {key!r} ({type(key).__name__}) is not a string; mapping keys must be strings (quote it)"
                 for key in value if type(key) is not str]
        return lines + [line for key, item in value.items() if type(key) is str
                        for line in non_json_problems(item, f"{where}.{key}")]
    text = str(value)
    shown = text if len(text) <= 40 else text[:37] + "..."
    return [f"{where}: {shown} ({type(value).__name__}) is not a JSON value; values travel to workers as "
            "JSON: quote it in the program file, or pass a string, number, boolean, list or mapping"]


def non_finite_input(values: Mapping[str, Any], where: str = "input") -> str | None:
    """A line naming a NaN or infinity inside named input values (JSON cannot carry them), or None."""
    stack = [(f"{where} '{name}'", value) for name, value in values.items()][::-1]
    seen: set[int] = set()
    while stack:
        at, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return (f"{at}: {value} is not a JSON number (JSON cannot carry NaN or infinity): "
                    "pass a finite number, or a string")
        if isinstance(value, dict | list | tuple) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += [(f"{at}[{key!r}]", item) for key, item in items][::-1]
    return None


# --- loading --------------------------------------------------------------------------------------


#: How deep mappings and lists may nest in a program file, counted from the file's top mapping
#: (serialising values to JSON fails past ~250 levels).
MAX_NESTING = 100
#: How many values YAML aliases may add beyond those the file spells out (a "billion laughs" file
#: of 550 bytes would expand to billions).
MAX_ALIAS_EXPANSION = 100_000

_BOOL_TAG = "tag:yaml.org,2002:bool"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ProgramLoader(yaml.SafeLoader):
    """A safe YAML loader for program files: duplicate keys are errors, YAML 1.1 booleans used as
    mapping keys (``on``, ``off``, ``yes``, ``no``...) are strings, and nesting is bounded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.nesting = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.nesting += 1
        try:
            if self.nesting > MAX_NESTING and self.check_event(yaml.CollectionStartEvent):
                line = self.peek_event().start_mark.line + 1
                raise ProgramError([f"line {line}: {_too_deep()}"])
            return super().compose_node(parent, index)
        finally:
            self.nesting -= 1


def _too_deep() -> str:
    return f"mappings and lists nest more than {MAX_NESTING} levels deep (the limit): flatten the value"


def _string_key(node: yaml.Node) -> yaml.Node:
    """A plain YAML 1.1 boolean key (``on:``) as the string it spells (values keep their type)."""
    if isinstance(node, yaml.ScalarNode) and node.tag == _BOOL_TAG:
        return yaml.ScalarNode(_STR_TAG, node.value, node.start_mark, node.end_mark, node.style)
    return node


def _construct_mapping(loader: _ProgramLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    node.value = [(_string_key(key), value) for key, value in node.value]
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # '<<: *base' merges base's keys (later keys override them)
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise ProgramError(
                [f"duplicate key '{key}' at line {key_node.start_mark.line + 1}: names must be unique"]
            )
        seen.add(key)
    loader.flatten_mapping(node)
    node.value = [(_string_key(key), value) for key, value in node.value]
    return loader.construct_mapping(node)


_ProgramLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ProgramError([f"duplicate key '{duplicates[0]}': names must be unique"])
    return dict(pairs)


def load_program_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON program file into a mapping (no validation beyond syntax and shape)."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProgramError(["file not found: check the path"], source) from None
    except IsADirectoryError:
        raise ProgramError(["is a directory: name the program file in it (PROGRAM.yaml)"], source) from None
    except UnicodeDecodeError as exc:
        raise ProgramError([f"{not_utf8(exc)}: a program file is YAML or JSON saved as UTF-8"], source) from None
    except OSError as exc:
        raise ProgramError([f"cannot read file ({exc.strerror})"], source) from None
    try:
        data = _parse_text(text, json_first=file.suffix.lower() == ".json")
        if not isinstance(data, dict):
            raise ProgramError(["a program file must be a mapping with 'name' and 'modules'"])
        check_shape(data)
    except ProgramError as exc:
        raise ProgramError(exc.problems, source) from None
    return data


def check_shape(data: dict[str, Any]) -> None:
    """Raise a ProgramError naming where loaded program data loops (an alias to an ancestor), nests
    deeper than :data:`MAX_NESTING`, expands its aliases past :data:`MAX_ALIAS_EXPANSION` values, or
    holds NaN or an infinity. One walk over its distinct mappings and lists (by ``id``)."""
    _ShapeWalk().visit(data, 1)


class _ShapeWalk:
    """The state of :func:`check_shape`: each distinct container's size (values, aliases expanded)
    and height (levels of containers, itself included), and the path being walked."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.heights: dict[int, int] = {}
        self.open: set[int] = set()
        self.path: list[Any] = []
        self.expansion = 0

    def visit(self, value: Any, depth: int) -> tuple[int, int]:
        """The size and height of ``value``, which sits ``depth`` containers deep (itself counted)."""
        if not isinstance(value, dict | list):
            if isinstance(value, float) and not math.isfinite(value):
                raise self.problem(f"{value} is not a JSON number (JSON cannot carry NaN or infinity): "
                                   "write a finite number, or quote it for a string")
            return 1, 0
        key = id(value)
        if key in self.open:
            raise self.problem("a YAML alias refers to a value that contains it (an endless loop): "
                               "write the value out or anchor a different one")
        if key in self.sizes:
            return self.revisit(key, depth)
        if depth > MAX_NESTING:
            raise self.problem(_too_deep(), short=True)
        self.open.add(key)
        size, height = 1, 0
        for name, item in value.items() if isinstance(value, dict) else enumerate(value):
            self.path.append(name)
            item_size, item_height = self.visit(item, depth + 1)
            self.path.pop()
            size, height = size + item_size, max(height, item_height)
        self.open.discard(key)
        self.sizes[key], self.heights[key] = size, height + 1
        return size, height + 1

    def revisit(self, key: int, depth: int) -> tuple[int, int]:
        """A container met again (a YAML alias): counted, not walked again."""
        size, height = self.sizes[key], self.heights[key]
        if depth + height - 1 > MAX_NESTING:
            raise self.problem(_too_deep(), short=True)
        self.expansion += size
        if self.expansion > MAX_ALIAS_EXPANSION:
            raise self.problem(f"YAML aliases expand the file by more than {MAX_ALIAS_EXPANSION:,} values "
                               "(the limit): alias fewer or smaller values, or write them out")
        return size, height

    def problem(self, text: str, *, short: bool = False) -> ProgramError:
        """The problem at the path being walked (``short``: its first six steps)."""
        parts = [str(part) for part in self.path]
        where = ".".join(parts[:6]) + "..." if short and len(parts) > 6 else ".".join(parts)
        return ProgramError([f"{where or 'program'}: {text}"])


def _parse_text(text: str, *, json_first: bool) -> Any:
    if json_first:
        try:
            return json.loads(text, object_pairs_hook=_unique_json_object)
        except json.JSONDecodeError as exc:
            raise ProgramError([f"invalid JSON at line {exc.lineno}: {exc.msg}"]) from None
        except RecursionError:
            raise ProgramError([_too_deep()]) from None
        except ValueError as exc:
            raise _beyond_limits(exc) from None
    try:
        return yaml.load(text, Loader=_ProgramLoader)  # a SafeLoader subclass
    except ValueError as exc:  # an integer literal longer than Python converts
        raise _beyond_limits(exc) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProgramError([f"invalid YAML{where}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ProgramError([f"invalid YAML: {exc}"]) from None


def _beyond_limits(exc: ValueError) -> ProgramError | ValueError:
    problem = beyond_parser_limits(exc)
    return exc if problem is None else ProgramError([f"the program {problem}"])


@without_collection
def parse_program(data: dict[str, Any], source: str = "program") -> ProgramSpec:
    """Validate a mapping against the program-file schema; every problem becomes one line."""
    try:
        return ProgramSpec.model_validate(data)
    except ValidationError as exc:
        raise ProgramError([_describe(error) for error in exc.errors()], source) from None


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    kind = error["type"]
    if kind == "extra_forbidden":
        parent, _, key = location.rpartition(".")
        return f"{parent or 'program'}: unknown key '{key}'"
    if kind == "missing":
        return f"{location}: required key is missing"
    if kind == "string_pattern_mismatch":
        return f"{location}: invalid value {error['input']!r} ({_pattern_hint(location)})"
    if kind == "string_type" and isinstance(error["input"], bool):
        return (f"{location}: {error['input']!r} is a boolean, not a string (YAML reads unquoted "
                "on/off/yes/no/true/false as booleans): quote it")
    return f"{location}: {error['msg']}"


def _pattern_hint(location: str) -> str:
    if location.endswith("compensate"):
        return "expected 'package.module:function' or the name of a method of the module's class"
    if location.endswith(("uses", "dspy.lm", "dspy.adapter")) or ".on." in location or ".ignore." in location:
        return "expected 'package.module:attribute'"
    return "expected a name of letters, digits and '_' not starting with a digit"
