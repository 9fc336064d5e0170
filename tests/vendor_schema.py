"""Check calls against vendor signatures stored in tests/data/vendor_schemas.json (no vendor import).

`OpSchema` reads torch's op-registration syntax (``name(Type arg=default, *, ...) -> ret``) and binds a
call the way the dispatcher would: too many positionals, an unknown or duplicated keyword, a missing
required argument, or a value of the wrong kind (a Tensor where the schema says ``int[]``, a list
where it says ``Tensor``) raise SchemaMismatch. `PySignature` does the same for Python signatures.
"""
from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import torch

SCHEMAS = json.loads((Path(__file__).parent / "data" / "vendor_schemas.json").read_text())


class SchemaMismatch(AssertionError):
    pass


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _kind_ok(type_: str, value) -> bool:
    optional = type_.endswith("?")
    base = type_.rstrip("?")
    if value is None:
        return optional
    if base == "Tensor":
        return isinstance(value, torch.Tensor)
    if base == "Tensor[]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value)
    if re.fullmatch(r"(int|SymInt)\[\d*\]", base):
        return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if base in ("int", "SymInt"):
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool":
        return isinstance(value, bool)
    if base == "str":
        return isinstance(value, str)
    if base == "ScalarType":
        return isinstance(value, torch.dtype)
    return True


class OpSchema:
    def __init__(self, text: str):
        m = re.fullmatch(r"\s*([\w.]+)\((.*)\)\s*->\s*(.+)", text)
        if m is None:
            raise ValueError(f"not an op schema: {text}")
        self.name = m.group(1)
        self.params, kw_only = [], False  # (name, type, has_default, keyword_only)
        for part in _split_top(m.group(2)):
            if part == "*":
                kw_only = True
                continue
            decl, _, default = part.partition("=")
            type_, name = decl.rsplit(None, 1)
            self.params.append((name, type_.strip(), bool(default), kw_only))

    def names(self) -> list[str]:
        return [p[0] for p in self.params]

    def bind(self, *args, **kwargs) -> dict:
        positional = [p for p in self.params if not p[3]]
        if len(args) > len(positional):
            raise SchemaMismatch(f"{self.name}: {len(args)} positional arguments, the schema takes {len(positional)}")
        bound = {p[0]: a for p, a in zip(positional, args)}
        by_name = {p[0]: p for p in self.params}
        for key, value in kwargs.items():
            if key not in by_name:
                raise SchemaMismatch(f"{self.name}: no argument named {key!r} (has {', '.join(by_name)})")
            if key in bound:
                raise SchemaMismatch(f"{self.name}: {key!r} given twice")
            bound[key] = value
        for name, type_, has_default, _ in self.params:
            if name not in bound and not has_default:
                raise SchemaMismatch(f"{self.name}: required argument {name!r} missing")
            if name in bound and not _kind_ok(type_, bound[name]):
                raise SchemaMismatch(f"{self.name}: {name!r} is {type_} but got {type(bound[name]).__name__}")
        return bound


class PySignature:
    def __init__(self, name: str, params: str):
        fn = ast.parse(f"def {name}{params}: pass").body[0].args
        defaults = [None] * (len(fn.args) - len(fn.defaults)) + list(fn.defaults)
        self.name = name
        self.signature = inspect.Signature([
            inspect.Parameter(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=inspect.Parameter.empty if d is None else ast.literal_eval(d))
            for a, d in zip(fn.args, defaults)])

    def bind(self, *args, **kwargs):
        try:
            return self.signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise SchemaMismatch(f"{self.name}: {exc}") from None


def npu_schema(op: str, version: str | None = None) -> OpSchema:
    entry = SCHEMAS["torch_npu"][op]
    return OpSchema((entry[version] if version else entry)["schema"])


def py_signature(package: str, name: str) -> PySignature:
    return PySignature(name, SCHEMAS[package][name]["python"])
