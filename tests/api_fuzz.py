"""A property-based API fuzz run over a server's OpenAPI schema (hypothesis + hypothesis-jsonschema,
driving httpx against the real server on a loopback port). Shared by the ingest and fleet-server runs.

Every operation of the schema gets ``max_examples`` requests, each built from:

| part | drawn from |
|---|---|
| path and query parameters | values the fixture knows (ids that exist; half the draws), the parameter's schema, or hostile values |
| ``Authorization`` | the credentials the fixture offers, the first two (the ones that work) drawn more often |
| headers the schema declares | as parameters |
| JSON body | the body schema (known values patched in); a known-good body of the fixture (``seeds``), as is or with one value at any depth swapped for a hostile one of the same kind (an integer for a huge one, a list for a string…); the schema's body mutated the same way; or hostile JSON documents: NaN, deep nesting, garbage |
| binary body | random bytes |

The run asserts only what every request must satisfy, whatever it is: the answer is not a 5xx. It
collects every 5xx (it does not stop at the first), so a report can say how many a build had.
Deterministic (``derandomize``), no example database, bounded by ``max_examples``.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

HUGE_INTS = [2**63, 2**63 - 1, 2**64, -(2**63) - 1, 10**30, -1, 0]
HOSTILE_STRINGS = ["", ".", "..", "../../etc/passwd", "a\x00b", "evil\u202egpj", "\u200b", "%00", "x" * 5000,
                   "9" * 40, "-1", "NaN", "1e400", "{}", "[]", "null", "\ud800".encode("utf-8", "surrogatepass")
                   .decode("utf-8", "replace")]


def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE_INTS), st.integers(),
                     st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324]),
                     st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20))


def hostile_json() -> st.SearchStrategy[bytes]:
    """JSON documents a well-behaved client never sends (as bytes: NaN and Infinity included)."""
    values = st.recursive(_scalars(), lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=12), inner,
                                                                              max_size=4)), max_leaves=12)
    depths = st.sampled_from([20, 200, 1_000, 5_000, 30_000])  # around and far past the recursion limit
    deep = depths.map(lambda n: b"[" * n + b"]" * n)
    deep_obj = depths.map(lambda n: b'{"a":' * min(n, 10_000) + b"1" + b"}" * min(n, 10_000))
    specials = st.sampled_from([b"NaN", b"Infinity", b'{"seq": NaN}', b'{"size": -Infinity}', b"{", b"", b"\xff\xfe",
                                b'{"a": 1, "a": 2}', b"1e99999", b"-" + b"9" * 5000])
    return st.one_of(values.map(lambda v: json.dumps(v).encode()), deep, deep_obj, specials)


def _resolve(schema: Any, components: Mapping[str, Any]) -> Any:
    """Inline ``#/components/schemas/…`` references (FastAPI's schemas are not recursive)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _resolve(components[ref.rsplit("/", 1)[1]], components)
        return {k: _resolve(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve(v, components) for v in schema]
    return schema


def _hostile_for(value: Any) -> st.SearchStrategy[Any]:
    """A replacement for ``value`` that a careless server mishandles: mostly of the same kind but out
    of range (the database's integers, floats beyond any unit), else of another kind entirely."""
    other = st.one_of(_scalars(), st.sampled_from(["abc", [], {}, [1], [{"x": 1}], {"a": {"b": {"c": []}}}]))
    if isinstance(value, bool):
        return st.one_of(st.sampled_from([0, 1, "true", None]), other)
    if isinstance(value, int):
        return st.one_of(st.sampled_from(HUGE_INTS), st.sampled_from(HUGE_INTS), other)
    if isinstance(value, float):
        return st.one_of(st.sampled_from([1e308, -1e308, 5e-324, float(2**64), -1.0]), other)
    if isinstance(value, str):
        return st.one_of(st.sampled_from(HOSTILE_STRINGS), other)
    return other


def _mutate(body: Any, data: st.DataObject, depth: int = 0) -> Any:
    """``body`` with one value, at a depth the draw picks, replaced by a hostile one (the top level is
    always descended into: whole hostile documents are another kind of body)."""
    if isinstance(body, dict) and body and (depth == 0 or data.draw(st.booleans(), label="descend")):
        key = data.draw(st.sampled_from(sorted(body)), label="key")
        return {**body, key: _mutate(body[key], data, depth + 1)}
    if isinstance(body, list) and body and (depth == 0 or data.draw(st.booleans(), label="descend")):
        i = data.draw(st.integers(0, len(body) - 1), label="index")
        return [*body[:i], _mutate(body[i], data, depth + 1), *body[i + 1:]]
    return data.draw(_hostile_for(body), label="hostile")


def _patch(body: Any, known: Mapping[str, Sequence[Any]], data: st.DataObject) -> Any:
    """With some probability, put known values (an enrolled vehicle's id…) into a schema-valid body."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key, values in known.items():
        if key in out and data.draw(st.integers(0, 3), label=f"patch {key}") > 0:
            out[key] = data.draw(st.sampled_from(list(values)), label=key)
    return out


@dataclass
class FuzzReport:
    requests: int = 0
    unsendable: int = 0  # requests httpx itself refuses to send (e.g. a NUL in a header)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # connections closed without an answer
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    by_operation: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[tuple[str, int, str]] = field(default_factory=list)

    def summary(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"{self.requests} requests over {len(self.per_operation)} operations "
                f"({self.unsendable} unsendable, {len(self.dropped)} dropped); statuses {codes}; "
                f"5xx: {len(self.server_errors)}")


@dataclass
class ApiFuzzer:
    """Fuzz every operation of ``openapi`` against the server at ``base_url``."""

    base_url: str
    openapi: Mapping[str, Any]
    credentials: Sequence[str | None]  # bearer tokens to try, None = no Authorization header
    known: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # parameter / body key → real values
    seeds: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # "METHOD /path" → known-good JSON bodies
    max_examples: int = 50
    skip: frozenset[str] = frozenset()  # "METHOD /path" not to fuzz
    report: FuzzReport = field(default_factory=FuzzReport)

    def operations(self) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for path, ops in self.openapi["paths"].items():
            for method, op in ops.items():
                if f"{method.upper()} {path}" not in self.skip:
                    out.append((method.upper(), path, op))
        return out

    def _param(self, p: Mapping[str, Any], components: Mapping[str, Any]) -> st.SearchStrategy[Any]:
        schema = _resolve(p.get("schema", {}), components)
        drawn: st.SearchStrategy[Any] = st.one_of(from_schema(schema), st.sampled_from(HOSTILE_STRINGS),
                                                  st.sampled_from(HUGE_INTS))
        strategy = drawn
        if p["name"] in self.known:
            known = st.sampled_from(list(self.known[p["name"]]))
            strategy = st.booleans().flatmap(lambda use_known: known if use_known else drawn)
        return strategy if p.get("required") else st.one_of(st.none(), strategy)

    def _body(self, key: str, op: Mapping[str, Any], components: Mapping[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
        content = op.get("requestBody", {}).get("content", {})
        bodies: list[st.SearchStrategy[tuple[str, Any]]] = [st.just(("none", None))]
        if "application/json" in content:
            schema = _resolve(content["application/json"].get("schema", {}), components)
            valid = from_schema(schema)
            bodies += [valid.map(lambda b: ("json", b)), valid.map(lambda b: ("mutated", b)),
                       hostile_json().map(lambda b: ("raw", b))]
            if self.seeds.get(key):
                seed = st.sampled_from(list(self.seeds[key]))
                bodies += [seed.map(lambda b: ("seed", b)), seed.map(lambda b: ("mutated-seed", b)),
                           seed.map(lambda b: ("mutated-seed", b))]
        for media in content:
            if media != "application/json":
                bodies.append(st.binary(max_size=4096).map(lambda b, m=media: ("bytes:" + m, b)))
        return st.one_of(*bodies)

    def run_operation(self, method: str, path: str, op: Mapping[str, Any], client: httpx.Client) -> None:
        components = self.openapi.get("components", {}).get("schemas", {})
        params = [p for p in op.get("parameters", []) if p["name"].lower() != "authorization"]
        param_strategies = {(p["in"], p["name"]): self._param(p, components) for p in params}
        creds = list(self.credentials)
        case = st.fixed_dictionaries({
            "params": st.fixed_dictionaries(param_strategies),
            "auth": st.one_of(st.sampled_from(creds[:2]), st.sampled_from(creds)),
            "body": self._body(f"{method} {path}", op, components),
        })

        @settings(max_examples=self.max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=case, data=st.data())
        def check(case: dict[str, Any], data: st.DataObject) -> None:
            self._send(method, path, case, client, data)

        check()

    def _send(self, method: str, path: str, case: dict[str, Any], client: httpx.Client, data: st.DataObject) -> None:
        url, query, headers = path, {}, {}
        for (where, name), value in case["params"].items():
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            if where == "path":
                url = url.replace("{" + name + "}", urllib.parse.quote(text, safe="") or "%20")
            elif where == "query":
                query[name] = text
            elif where == "header":
                headers[name] = text
        if case["auth"] is not None:
            headers["Authorization"] = f"Bearer {case['auth']}"
        kind, body = case["body"]
        kwargs: dict[str, Any] = {}
        if kind in ("json", "mutated", "seed", "mutated-seed"):
            if kind in ("json", "mutated"):
                body = _patch(body, self.known, data)
            if kind.startswith("mutated"):
                body = _mutate(body, data)
            kwargs["content"] = json.dumps(body, allow_nan=True).encode()
            headers["Content-Type"] = "application/json"
        elif kind == "raw":
            kwargs["content"] = body
            headers["Content-Type"] = "application/json"
        elif kind.startswith("bytes:"):
            kwargs["content"] = body
            headers["Content-Type"] = kind.split(":", 1)[1]
        try:
            r = client.request(method, url, params=query, headers=headers, **kwargs)
        except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
            self.report.unsendable += 1
            return
        except httpx.TransportError as e:  # answered early and closed while the body was still being sent
            self.report.dropped.append((f"{method} {url}", f"{type(e).__name__}: {e}"))
            return
        self.report.requests += 1
        self.report.per_operation[f"{method} {path}"] += 1
        self.report.statuses[r.status_code] += 1
        self.report.by_operation[f"{method} {path}"][r.status_code] += 1
        if r.status_code >= 500:
            self.report.server_errors.append((f"{method} {url}", r.status_code, r.text[:200]))

    def run(self) -> FuzzReport:
        with httpx.Client(base_url=self.base_url, timeout=30.0) as client:
            for method, path, op in self.operations():
                self.run_operation(method, path, op, client)
        return self.report
