"""The constraint spec: teachers (names and settings), the unsafe set, constraints, dual rule and checks.

Written in YAML or TOML and loaded with :func:`load_spec`; errors are :class:`SpecError` naming the key path
(``constraints[2].max``) and, where the file format allows, the line. ``Spec.from_dict(spec.to_dict())`` round-trips.
Callables (metric functions, ``where`` predicates, unsafe masks) appear in files by name and are resolved through
the ``functions`` registry given to :func:`load_spec` / :meth:`Spec.from_dict`.

Example (YAML)::

    teachers:
      - {name: clean, safety: 0.9}
      - {name: raw, safety: 0.1, temperature: 2.0}
    unsafe: {ids: [3, 17, 42]}
    constraints:
      - {kind: cap, teacher: raw, max: 0.4}
      - {kind: unsafe_mass, max: 0.05}
      - {kind: unsafe_rate, max: 0.02}
    dual: {rule: nupi, lr: 0.05, kp: 0.1}
"""
from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

import solvers
from safekd.spec import constraints as C
from safekd.spec.unsafe import UnsafeSet

__all__ = ["Spec", "TeacherSpec", "DualSpec", "ChecksSpec", "SpecError", "SpecDocument", "load_spec", "load_document",
           "DUAL_RULES", "Locator"]

DUAL_RULES = ("gradient_ascent", "nupi", "augmented_lagrangian")
ON_ALARM = ("warn", "stop", "relax")
Locator = Callable[[str], "int | None"]


class SpecError(ValueError):
    """An invalid spec; ``key`` is the key path (``constraints[1].max``) and ``line`` the 1-based line or None."""

    def __init__(self, key: str, message: str, line: int | None = None, source: str | None = None) -> None:
        self.key, self.line, self.source = key, line, source
        self.errors: tuple[SpecError, ...] = (self,)
        where = (f"{source}:" if source else "") + (f"{line}: " if line is not None else (" " if source else ""))
        super().__init__(f"{where}{key}: {message}")

    @classmethod
    def many(cls, errors: list["SpecError"]) -> "SpecError":
        """Several errors as one: the first's key and line, a message listing all of them (one line each, in
        file order), and ``errors`` holding each."""
        errors = sorted(errors, key=lambda e: (e.line is None, e.line or 0))
        first = errors[0]
        out = cls.__new__(cls)
        out.key, out.line, out.source, out.errors = first.key, first.line, first.source, tuple(errors)
        ValueError.__init__(out, f"{len(errors)} errors in the spec:\n" + "\n".join(str(e) for e in errors))
        return out


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's name, safety score σ (higher = safer; only its order matters) and softening temperature."""

    name: str
    safety: float | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class DualSpec:
    """The dual rule and its settings; the multiplier is updated every ``every`` steps from the window's rate."""

    rule: str = "gradient_ascent"
    lr: float = 0.01
    kp: float = 0.0
    ki: float = 1.0
    ema_nu: float = 0.0
    penalty: float = 1.0
    growth: float = 2.0
    max_penalty: float = 100.0
    patience: int = 10
    every: int = 1
    init: float = 0.0


@dataclass(frozen=True)
class ChecksSpec:
    """Runtime checks: cvxpy re-projection of ``reference_rows`` rows every ``reference_every`` steps (0 = off);
    the multiplier alarm over ``alarm_window`` dual steps (0 = off: λ grew, the violation stayed above
    ``alarm_min_violation`` and shows no decrease significant at ``alarm_level``), and what an alarm does
    (``on_alarm``: ``warn``, ``stop``, or ``relax``: resilient relaxation of cost (``relax_cost``/2)·u² stepped with
    ``relax_lr``, default the dual ``lr``)."""

    reference_every: int = 50
    reference_rows: int = 8
    reference_tol: float | None = None
    alarm_window: int = 50
    alarm_min_violation: float = 1e-3
    alarm_level: float = 0.05
    on_alarm: str = "warn"
    relax_cost: float = 1.0
    relax_lr: float | None = None


@dataclass(frozen=True)
class Spec:
    """Teachers, unsafe set, constraints and settings (immutable). See the module docstring for the file format."""

    teachers: tuple[TeacherSpec, ...]
    constraints: tuple[C.Constraint, ...] = ()
    unsafe: UnsafeSet | None = None
    temperature: float = 1.0
    dual: DualSpec = field(default_factory=DualSpec)
    checks: ChecksSpec = field(default_factory=ChecksSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "teachers", tuple(self.teachers))
        object.__setattr__(self, "constraints", tuple(self.constraints))
        if self.unsafe is not None and not isinstance(self.unsafe, UnsafeSet):
            object.__setattr__(self, "unsafe", UnsafeSet.coerce(self.unsafe))
        # Validate the whole value through the same code the file loader uses (errors name the key path).
        _validate(self, lambda key: None, None)

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.teachers)

    @property
    def teacher_index(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.teachers)}

    @property
    def teacher_weight_constraints(self) -> tuple[C.TeacherWeightConstraint, ...]:
        return tuple(c for c in self.constraints if isinstance(c, C.TeacherWeightConstraint))

    @property
    def student_constraints(self) -> tuple[C.StudentConstraint, ...]:
        return tuple(c for c in self.constraints if isinstance(c, C.StudentConstraint))

    def safety_scores(self, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor | None:
        """σ as a ``[K]`` tensor, or None unless every teacher has ``safety`` set."""
        if any(t.safety is None for t in self.teachers):
            return None
        return torch.tensor([t.safety for t in self.teachers], dtype=dtype, device=device)

    def static_feasible_set(self, dtype: torch.dtype = torch.float64,
                            device: torch.device | None = None) -> solvers.FeasibleSet:
        """The ``solvers.FeasibleSet`` of the static teacher-weight constraints (caps, floors, groups, order): the
        simplex over the teachers cut by each of them, in spec order."""
        fs = solvers.FeasibleSet.simplex(len(self.teachers), dtype=dtype, device=device)
        safety = self.safety_scores(dtype=dtype, device=device)
        for c in self.teacher_weight_constraints:
            if not c.per_token:
                fs = c.apply_static(fs, self.teacher_index, safety)
        return fs

    def teacher_temperatures(self) -> list[float]:
        """Per-teacher softening temperature T_k applied before pooling (default 1). The spec's ``temperature`` is
        the divergence temperature: it softens the pooled target and the student alike."""
        return [t.temperature if t.temperature is not None else 1.0 for t in self.teachers]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of str/float/int/bool/list/None (YAML-, TOML- and ``weights_only``-safe)."""
        out: dict[str, Any] = {
            "teachers": [{k: v for k, v in (("name", t.name), ("safety", t.safety), ("temperature", t.temperature))
                          if v is not None} for t in self.teachers],
            "constraints": [c.to_dict() for c in self.constraints],
            "temperature": self.temperature,
            "dual": {f.name: getattr(self.dual, f.name) for f in fields(DualSpec)},
            "checks": {f.name: getattr(self.checks, f.name) for f in fields(ChecksSpec)
                       if getattr(self.checks, f.name) is not None},
        }
        if self.unsafe is not None:
            out["unsafe"] = self.unsafe.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, functions: Mapping[str, Callable[..., Any]] | None = None,
                  source: str | None = None, locate: Locator | None = None) -> "Spec":
        """Parse and validate a dict (as read from YAML/TOML); callables are looked up by name in ``functions``."""
        return _Parser(functions or {}, locate or (lambda key: None), source).spec(data)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are bools (so a key ``on:`` stays the string "on")."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch in "tTfF":
    _Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), [_ch])


@dataclass(frozen=True)
class SpecDocument:
    """A spec file as read, before validation: its top-level mapping, the ``locate(key_path) -> line`` function
    (1-based line of ``"constraints[1].max"`` or of its deepest existing prefix; None where unknown) and the path.
    Files that carry more than a spec (a job file's ``job:`` section) parse their own keys from ``data`` and report
    errors as ``SpecError(key, message, locate(key), source)``."""

    data: dict[str, Any]
    locate: Locator
    source: str


def load_document(path: str | Path) -> SpecDocument:
    """Read a ``.yaml``/``.yml`` (YAML 1.2 booleans: only true/false) or ``.toml`` file into a :class:`SpecDocument`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SpecError: unknown suffix, invalid YAML/TOML (with the line where known), or a top level that is not a
            mapping.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError("<file>", f"not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset {exc.start}); a spec "
                        "is YAML or TOML text", raw[:exc.start].count(b"\n") + 1, str(path)) from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            node = yaml.compose(text, Loader=_Loader)
            _reject_duplicate_keys(node, str(path))
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise SpecError("<file>", f"invalid YAML: {getattr(exc, 'problem', None) or exc}",
                            None if mark is None else mark.line + 1, str(path)) from exc
        locate = _yaml_locator(node)
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            raise SpecError("<file>", f"invalid TOML: {exc}", int(m.group(1)) if m else None, str(path)) from exc
        locate = _toml_locator(text)
    else:
        raise SpecError("<file>", f"unknown spec format {suffix!r}; use .yaml, .yml or .toml", None, str(path))
    if not isinstance(data, dict):
        raise SpecError("<root>", f"the spec must be a mapping, got {type(data).__name__}", 1, str(path))
    return SpecDocument(data=data, locate=locate, source=str(path))


def load_spec(path: str | Path, *, functions: Mapping[str, Callable[..., Any]] | None = None) -> Spec:
    """Load a ``.yaml``/``.yml`` or ``.toml`` spec; errors are :class:`SpecError` with key path and line. Everything
    knowable without data is checked here (types, ranges, duplicate keys, names, dual settings, and the feasibility
    of the static teacher-weight constraints, naming a minimal conflicting subset with its lines)."""
    doc = load_document(path)
    return Spec.from_dict(doc.data, functions=functions, source=doc.source, locate=doc.locate)


# -------------------------------------------------------------------------------------------------------------------
# parsing
# -------------------------------------------------------------------------------------------------------------------
# kind -> (required keys, optional keys) beyond name/tolerance
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cap": (("teacher", "max"), ()),
    "floor": (("teacher", "min"), ()),
    "group_cap": (("teachers", "max"), ()),
    "exclude": (("teacher", "where"), ()),
    "unsafe_mass": (("max",), ("unsafe",)),
    "safety_order": ((), ("scores",)),
    "unsafe_rate": (("max",), ("unsafe", "margin")),
    "kl_to": (("teacher", "max"), ("on", "support", "margin")),
    "retain": (("metric", "min"), ("proxy", "support", "margin")),
    "metric": (("fn", "sense", "threshold"), ("proxy", "support", "margin")),
    "min_entropy": (("min",), ()),
    "kl_ball": (("reference", "max"), ()),
    "stability": (("max",), ("scale",)),
    "convex": (("fn",), ("values", "params", "smooth")),
}
_TOP = ("teachers", "constraints", "unsafe", "temperature", "dual", "checks")


class _Parser:
    def __init__(self, functions: Mapping[str, Callable[..., Any]], locate: Locator, source: str | None) -> None:
        self.functions, self.locate, self.source = functions, locate, source

    def error(self, key: str, message: str) -> SpecError:
        return SpecError(key, message, self.locate(key), self.source)

    def keys(self, d: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> Mapping[str, Any]:
        if not isinstance(d, Mapping):
            raise self.error(key, f"expected a mapping, got {type(d).__name__}")
        for k in d:
            if k not in allowed:
                raise self.error(f"{key}.{k}" if key else str(k), f"unknown key {k!r}; allowed: {list(allowed)}")
        for k in required:
            if k not in d:
                raise self.error(key or "<root>", f"missing required key {k!r}")
        return d

    def number(self, v: Any, key: str, *, integer: bool = False, lo: float | None = None) -> Any:
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
            raise self.error(key, f"expected {'an integer' if integer else 'a finite number'}, got {v!r}")
        if lo is not None and v < lo:
            raise self.error(key, f"must be >= {lo}, got {v}")
        return int(v) if integer else float(v)

    def string(self, v: Any, key: str) -> str:
        if not isinstance(v, str) or not v:
            raise self.error(key, f"expected a non-empty string, got {v!r}")
        return v

    def fn(self, v: Any, key: str) -> Callable[..., Any]:
        name = self.string(v, key)
        if name not in self.functions:
            raise self.error(key, f"function {name!r} is not registered; pass functions={{{name!r}: fn}} to load_spec"
                             f" (registered: {sorted(self.functions)})")
        return self.functions[name]

    def unsafe(self, v: Any, key: str) -> UnsafeSet:
        d = self.keys(v, key, ("ids", "fn"))
        if len(d) != 1:
            raise self.error(key, "give exactly one of 'ids' (token ids / class indices) or 'fn' (a registered mask)")
        if "fn" in d:
            f = self.fn(d["fn"], f"{key}.fn")
            return UnsafeSet(fn=f, name=d["fn"])
        ids = d["ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in ids):
            raise self.error(f"{key}.ids", f"expected a non-empty list of non-negative integers, got {ids!r}")
        return UnsafeSet(ids=ids)

    def predicate(self, v: Any, key: str) -> C.TokenPredicate:
        d = self.keys(v, key, ("task_ids", "labels", "fn"))
        if len(d) != 1:
            raise self.error(key, "give exactly one of 'task_ids', 'labels' or 'fn'")
        (k, val), = d.items()
        if k == "fn":
            return C.TokenPredicate(fn=self.fn(val, f"{key}.fn"), fn_name=val)
        vals = [val] if isinstance(val, int) and not isinstance(val, bool) else val
        if not isinstance(vals, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vals):
            raise self.error(f"{key}.{k}", f"expected an integer or a list of integers, got {val!r}")
        return C.TokenPredicate(**{k: tuple(vals)})

    def teacher(self, v: Any, key: str, known: tuple[str, ...]) -> str:
        name = self.string(v, key)
        if name not in known:
            raise self.error(key, f"unknown teacher {name!r}; known teachers: {list(known)}")
        return name

    def constraint(self, d: Any, key: str, known: tuple[str, ...]) -> C.Constraint:
        if not isinstance(d, Mapping) or "kind" not in d:
            raise self.error(key, "each constraint needs a 'kind'")
        kind = d["kind"]
        if kind not in _KINDS:
            raise self.error(f"{key}.kind", f"unknown constraint kind {kind!r}; known: {sorted(_KINDS)}")
        req, opt = _KINDS[kind]
        self.keys(d, key, ("kind", "name", "tolerance") + req + opt, req)
        k = lambda a: f"{key}.{a}"  # noqa: E731
        common: dict[str, Any] = {}
        if "name" in d:
            common["name"] = self.string(d["name"], k("name"))
        if "tolerance" in d:
            common["tolerance"] = self.number(d["tolerance"], k("tolerance"), lo=0.0)
        student: dict[str, Any] = {}  # student constraints only: the audit's declared support, the training margin
        if "margin" in d:
            student["margin"] = self.number(d["margin"], k("margin"), lo=0.0)
        if "support" in d:
            sup = d["support"]
            if sup != "binary" and not (isinstance(sup, list) and len(sup) == 2):
                raise self.error(k("support"), f"expected 'binary' or [lo, hi], got {sup!r}")
            student["support"] = sup if sup == "binary" else [self.number(x, f"{k('support')}[{i}]")
                                                               for i, x in enumerate(sup)]
        try:
            if kind == "cap":
                return C.cap(self.teacher(d["teacher"], k("teacher"), known), self.number(d["max"], k("max")), **common)
            if kind == "floor":
                return C.floor(self.teacher(d["teacher"], k("teacher"), known), self.number(d["min"], k("min")),
                               **common)
            if kind == "group_cap":
                ts = d["teachers"]
                if not isinstance(ts, list) or not ts:
                    raise self.error(k("teachers"), f"expected a non-empty list of teacher names, got {ts!r}")
                names = [self.teacher(t, f"{k('teachers')}[{i}]", known) for i, t in enumerate(ts)]
                return C.group_cap(names, self.number(d["max"], k("max")), **common)
            if kind == "exclude":
                return C.exclude(self.teacher(d["teacher"], k("teacher"), known),
                                 self.predicate(d["where"], k("where")), **common)
            if kind in ("unsafe_mass", "unsafe_rate"):
                u = self.unsafe(d["unsafe"], k("unsafe")) if "unsafe" in d else None
                make = C.unsafe_mass if kind == "unsafe_mass" else C.unsafe_rate
                return make(self.number(d["max"], k("max")), unsafe=u, **common, **student)
            if kind == "safety_order":
                scores = None
                if "scores" in d:
                    s = self.keys(d["scores"], k("scores"), known, known)
                    scores = {t: self.number(s[t], f"{k('scores')}.{t}") for t in known}
                return C.safety_order(scores, **common)
            if kind == "kl_to":
                on = self.predicate(d["on"], k("on")) if "on" in d else None
                return C.kl_to(self.teacher(d["teacher"], k("teacher"), known), self.number(d["max"], k("max")),
                               on=on, **common, **student)
            if kind == "retain":
                m = d["metric"]
                metric: Any = m if m in C._RETAIN_BUILTINS else self.fn(m, k("metric"))
                proxy = self.fn(d["proxy"], k("proxy")) if "proxy" in d else None
                r = C.retain(metric, self.number(d["min"], k("min")), proxy=proxy, **common, **student)
                return _renamed(r, metric_name=m, proxy_name=d.get("proxy"))
            if kind == "min_entropy":  # convex teacher-weight constraints (solvers.convex)
                return C.min_entropy(self.number(d["min"], k("min")), **common)
            if kind == "kl_ball":
                ref = self.keys(d["reference"], k("reference"), known, known)
                return C.kl_ball({t: self.number(ref[t], f"{k('reference')}.{t}") for t in known},
                                 self.number(d["max"], k("max")), **common)
            if kind == "stability":
                return C.stability(self.number(d["max"], k("max")), self.string(d.get("scale", "task"), k("scale")),
                                   **common)
            if kind == "convex":
                if not isinstance(d.get("smooth", True), bool):
                    raise self.error(k("smooth"), f"expected true or false, got {d['smooth']!r}")
                ps = self.keys(d.get("params", {}), k("params"), tuple(d.get("params", {})))
                cv = C.convex(self.fn(d["fn"], k("fn")), values=self.fn(d["values"], k("values")) if "values" in d
                              else None, params={n: torch.tensor(v, dtype=torch.float64) for n, v in ps.items()},
                              smooth=d.get("smooth", True), **common)
                return _renamed(cv, fn_name=d["fn"], values_name=d.get("values"))
            # metric
            sense = d["sense"]
            if sense not in ("<=", ">="):
                raise self.error(k("sense"), f"expected '<=' or '>=', got {sense!r}")
            proxy = self.fn(d["proxy"], k("proxy")) if "proxy" in d else None
            mt = C.metric(self.fn(d["fn"], k("fn")), sense, self.number(d["threshold"], k("threshold")), proxy=proxy,
                          **common, **student)
            return _renamed(mt, fn_name=d["fn"], proxy_name=d.get("proxy"))
        except SpecError:
            raise
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from exc

    def spec(self, data: Mapping[str, Any]) -> Spec:
        """The spec of ``data``. Every part is parsed even after an error (each teacher; each constraint, once the
        teachers it names are valid; ``unsafe``, ``temperature``, ``dual``, ``checks``), so that one
        :class:`SpecError` lists every error found (one line each); the checks across parts (names, feasibility)
        run once the parts are valid."""
        errors: list[SpecError] = []

        def attempt(fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return fn(*args)
            except SpecError as exc:
                errors.append(exc)
                return None

        attempt(self.keys, data, "", _TOP, ("teachers",))
        ts = data.get("teachers")
        if "teachers" in data and (not isinstance(ts, list) or not ts):
            errors.append(self.error("teachers", "expected a non-empty list of teachers"))
        teachers = [attempt(self.teacher_spec, t, f"teachers[{i}]") for i, t in enumerate(ts or [])] \
            if isinstance(ts, list) else []
        teachers_ok = not errors
        known = tuple(t.name for t in teachers if t is not None)
        cs = data.get("constraints", [])
        if not isinstance(cs, list):
            errors.append(self.error("constraints", f"expected a list of constraints, got {type(cs).__name__}"))
            cs = []
        # constraints name teachers: they are parsed once every teacher parsed (else their errors would repeat the
        # teachers' ones)
        constraints = [attempt(self.constraint, c, f"constraints[{i}]", known) for i, c in enumerate(cs)] \
            if teachers_ok else []
        unsafe = attempt(self.unsafe, data["unsafe"], "unsafe") if "unsafe" in data else None
        temperature = attempt(self.number, data.get("temperature", 1.0), "temperature")
        dual = attempt(self.section, data.get("dual", {}), "dual", DualSpec)
        checks = attempt(self.section, data.get("checks", {}), "checks", ChecksSpec)
        if errors:
            raise errors[0] if len(errors) == 1 else SpecError.many(errors)
        constraints = tuple(constraints)
        spec = object.__new__(Spec)
        for name, value in (("teachers", tuple(teachers)), ("constraints", constraints), ("unsafe", unsafe),
                            ("temperature", temperature), ("dual", dual), ("checks", checks)):
            object.__setattr__(spec, name, value)
        _validate(spec, self.locate, self.source)
        _check_static_feasible(spec, self.locate, self.source)
        return spec

    def teacher_spec(self, t: Any, key: str) -> TeacherSpec:
        t = {"name": t} if isinstance(t, str) else t
        self.keys(t, key, ("name", "safety", "temperature"), ("name",))
        return TeacherSpec(
            name=self.string(t["name"], f"{key}.name"),
            safety=self.number(t["safety"], f"{key}.safety") if "safety" in t else None,
            temperature=self.number(t["temperature"], f"{key}.temperature") if "temperature" in t else None)

    def section(self, d: Any, key: str, cls: type) -> Any:
        names = tuple(f.name for f in fields(cls))
        self.keys(d, key, names)
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in ("rule", "on_alarm"):
                kw[f.name] = self.string(v, f"{key}.{f.name}")
            elif f.name in ("reference_tol", "relax_lr") and v is None:
                kw[f.name] = None
            else:
                kw[f.name] = self.number(v, f"{key}.{f.name}", integer=isinstance(f.default, int))
        return cls(**kw)


def _renamed(c: C.Constraint, **names: Any) -> C.Constraint:
    """Keep the names callables were registered under (so to_dict writes them back)."""
    for k, v in names.items():
        if v is not None:
            object.__setattr__(c, k, v)
    return c


def _validate(spec: Spec, locate: Locator, source: str | None) -> None:
    """Cross-field checks shared by :class:`Spec` construction and file loading."""
    def err(key: str, msg: str) -> SpecError:
        return SpecError(key, msg, locate(key), source)

    if not spec.teachers:
        raise err("teachers", "at least one teacher is required")
    seen: dict[str, int] = {}
    for i, t in enumerate(spec.teachers):
        if not isinstance(t, TeacherSpec):
            raise err(f"teachers[{i}]", f"expected a TeacherSpec, got {type(t).__name__}")
        if not isinstance(t.name, str) or not t.name.strip():
            raise err(f"teachers[{i}].name", f"a teacher name must be a non-empty string, got {t.name!r}")
        for k in ("safety", "temperature"):
            v = getattr(t, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise err(f"teachers[{i}].{k}", f"expected a finite number, got {v!r}")
        if t.name in seen:
            raise err(f"teachers[{i}].name", f"duplicate teacher name {t.name!r} (also teachers[{seen[t.name]}])")
        seen[t.name] = i
        if t.temperature is not None and not t.temperature > 0:
            raise err(f"teachers[{i}].temperature", f"must be > 0, got {t.temperature}")
    if not spec.temperature > 0:
        raise err("temperature", f"must be > 0, got {spec.temperature}")
    names: dict[str, int] = {}
    for i, c in enumerate(spec.constraints):
        if not isinstance(c, C.Constraint):
            raise err(f"constraints[{i}]", f"expected a constraint, got {type(c).__name__}")
        if not isinstance(c.name, str) or not c.name.strip():
            raise err(f"constraints[{i}].name", f"a constraint name must be a non-empty string, got {c.name!r}")
        if c.name in names:
            raise err(f"constraints[{i}].name", f"duplicate constraint name {c.name!r} (also constraints[{names[c.name]}]);"
                      " give one of them `name=`")
        names[c.name] = i
        for t in c.teachers_used():
            if t not in seen:
                raise err(f"constraints[{i}]", f"constraint {c.name!r} names unknown teacher {t!r}; "
                          f"known teachers: {list(seen)}")
        if isinstance(c, (C.UnsafeMass, C.UnsafeRate)) and c.unsafe is None and spec.unsafe is None:
            raise err(f"constraints[{i}]", f"constraint {c.name!r} needs an unsafe set: add a top-level 'unsafe' "
                      "(ids or fn) or give the constraint its own")
        if isinstance(c, C.SafetyOrder) and c.scores is None and any(t.safety is None for t in spec.teachers):
            missing = [t.name for t in spec.teachers if t.safety is None]
            raise err(f"constraints[{i}]", f"safety_order needs a 'safety' score on every teacher; missing on {missing}")
    d = spec.dual
    if d.rule not in DUAL_RULES:
        raise err("dual.rule", f"unknown dual rule {d.rule!r}; choose one of {list(DUAL_RULES)}")
    _check_numbers(err, "dual", d, {
        "lr": (0, None, True), "kp": (0, None, False), "ki": (0, None, False), "ema_nu": (0, 1, False),
        "penalty": (0, None, True), "growth": (1, None, False),
        "max_penalty": (d.penalty, None, False, f"dual.penalty ({d.penalty})"),
        "init": (0, None, False), "every": (1, None, False), "patience": (1, None, False)})
    ch = spec.checks
    if ch.on_alarm not in ON_ALARM:
        raise err("checks.on_alarm", f"expected one of {list(ON_ALARM)}, got {ch.on_alarm!r}")
    _check_numbers(err, "checks", ch, {
        "reference_every": (0, None, False), "reference_rows": (0, None, False), "alarm_window": (0, None, False),
        "reference_tol": (0, None, False), "alarm_min_violation": (0, None, False), "alarm_level": (0, 1, True),
        "relax_cost": (0, None, True), "relax_lr": (0, None, True)})


def _check_numbers(err: Callable[[str, str], SpecError], section: str, obj: Any,
                   rules: Mapping[str, tuple[Any, ...]]) -> None:
    """Each ``rules[key] = (low, high, strict[, what low is])``: a finite number (an integer where the default is
    one), ≥ low (> low when strict) and < high when given; None values are skipped."""
    for k, (lo, hi, strict, *name) in rules.items():
        v = getattr(obj, k)
        if v is None:
            continue
        integer = type(getattr(type(obj), k, None)) is int
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise err(f"{section}.{k}", f"expected {'an integer' if integer else 'a number'}, got {v!r}")
        if not math.isfinite(v) or (v <= lo if strict else v < lo) or (hi is not None and v >= hi):
            bound = (f"in {'(' if strict else '['}{lo:g}, {hi:g})" if hi is not None
                     else f"{'>' if strict else '>='} {name[0] if name else f'{lo:g}'}")
            raise err(f"{section}.{k}", f"must be {bound}, got {v!r}")


def _check_static_feasible(spec: Spec, locate: Locator, source: str | None) -> None:
    """The static teacher-weight constraints (caps, floors, groups, order) must leave some weights on the simplex;
    otherwise name a minimal conflicting subset (``solvers.diagnose``) with each member's key and line."""
    if not any(not c.per_token for c in spec.teacher_weight_constraints):
        return
    diag = solvers.diagnose(spec.static_feasible_set())
    if diag.success:
        return
    where = {c.name: i for i, c in enumerate(spec.constraints)}
    members = sorted((n for n in diag.conflict if n in where), key=where.__getitem__)  # in file order
    key = f"constraints[{where[members[0]]}]" if members else "constraints"
    parts = []
    for n in members:
        line = locate(f"constraints[{where[n]}]")
        parts.append(f"{n!r} (constraints[{where[n]}]" + (f", line {line})" if line is not None else ")"))
    raise SpecError(key, "the static teacher-weight constraints leave no feasible weights; minimal conflicting "
                    f"subset: {', '.join(parts)} ({diag.message})", locate(key), source)


def _reject_duplicate_keys(node: Any, source: str) -> None:
    """A YAML mapping with a key twice would silently keep the last value: refuse it, naming both lines."""
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            first: dict[Any, int] = {}
            for k, v in n.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else None
                if name is not None and name in first:
                    raise SpecError(str(name), f"duplicate key {name!r} (first at line {first[name]}); YAML keeps only "
                                    "the last value, so remove one", k.start_mark.line + 1, source)
                if name is not None:
                    first[name] = k.start_mark.line + 1
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)


# -------------------------------------------------------------------------------------------------------------------
# key path -> line
# -------------------------------------------------------------------------------------------------------------------
def _yaml_locator(root: Any) -> Locator:
    """Line of a key path in a composed YAML node tree (the deepest existing prefix)."""
    def locate(key: str) -> int | None:
        node, line = root, (root.start_mark.line + 1 if root is not None else None)
        for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
            if isinstance(node, yaml.MappingNode):
                hit = next(((k, v) for k, v in node.value if k.value == part), None)
                if hit is None:
                    break
                line, node = hit[0].start_mark.line + 1, hit[1]
            elif isinstance(node, yaml.SequenceNode) and part.startswith("["):
                i = int(part[1:-1])
                if i >= len(node.value):
                    break
                node = node.value[i]
                line = node.start_mark.line + 1
            else:
                break
        return line
    return locate


def _toml_locator(text: str) -> Locator:
    """Line of a key path in TOML text, by scanning table headers (``[x]``, ``[[x]]``) and ``key =`` lines."""
    lines = text.splitlines()
    table_starts: dict[str, int] = {}
    counters: dict[str, int] = {}
    current = ""
    entries: dict[str, int] = {}
    for no, raw in enumerate(lines, 1):
        s = raw.split("#", 1)[0].strip()
        if m := re.fullmatch(r"\[\[\s*([\w.\-]+)\s*\]\]", s):
            name = m.group(1)
            counters[name] = counters.get(name, -1) + 1
            current = f"{name}[{counters[name]}]"
            table_starts[current] = no
        elif m := re.fullmatch(r"\[\s*([\w.\-]+)\s*\]", s):
            current = m.group(1)
            table_starts[current] = no
        elif m := re.match(r"([\w\-]+)\s*=", s):
            entries[f"{current}.{m.group(1)}" if current else m.group(1)] = no

    def locate(key: str) -> int | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in entries:
                return entries[prefix]
            if prefix in table_starts:
                return table_starts[prefix]
        return None
    return locate
