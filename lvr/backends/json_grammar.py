"""A character-level state machine for JSON that matches a schema, for constrained decoding.

`JsonGrammar(schema)` compiles the schema subset of `lvr.backends.schema` into nodes; a parse state is
an immutable, hashable tuple of (node index, local state) frames (a pushdown automaton), so the
decoder can try a candidate token by feeding its characters to a copy of the state, and cache
per-state results. `min_rest(state)` is the fewest characters that can still complete the document,
which lets the decoder refuse tokens that would make the JSON impossible to finish within the token
budget: generation then always ends with complete JSON.

The language is deliberately narrower than JSON, never wider:
- object keys appear exactly once each, in the schema's `properties` order, only the required ones
  (all properties when `required` is absent); no whitespace between a key and its colon;
- at most `ws_max` whitespace characters (space, newline) in each structural gap;
- strings: no control characters, standard escapes, length in [minLength, maxLength or
  `max_string`]; numbers: no exponent, at most 15 integer and 6 fraction digits;
- arrays: item count in [minItems, maxItems or `max_items`];
- enums / const / booleans / null: exactly the listed literals.
Numeric minimum/maximum are not enforced while decoding (validation reports them afterwards).

>>> g = JsonGrammar({"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}})
>>> g.is_complete(g.feed(g.initial(), '{"a": 12}'))
True
>>> g.feed(g.initial(), '{"b"') is None
True
"""

from __future__ import annotations

import json
from typing import Any

from lvr.backends.schema import check_supported

State = tuple[tuple[int, Any], ...]
# Step results of a node: ("S", local) consumed and stays; ("D",) consumed and finished;
# ("X",) finished without consuming (the parent gets the char); ("P", local, child) consumed by a
# child: the node moves to `local` and the child starts on this char.
_DONE = ("D",)
_EXIT = ("X",)
_WS = " \n"


class _Node:
    def start(self) -> Any:
        raise NotImplementedError

    def step(self, local: Any, ch: str) -> tuple | None:
        raise NotImplementedError

    def min_rest(self, local: Any) -> int:
        raise NotImplementedError

    def min_len(self) -> int:
        return self.min_rest(self.start())


class _Literal(_Node):
    """One of several literal texts (enum values, booleans, null, const)."""

    def __init__(self, options: list[str]):
        self.options = sorted(set(options))

    def start(self) -> str:
        return ""

    def step(self, local: str, ch: str) -> tuple | None:
        cand = local + ch
        if any(o.startswith(cand) for o in self.options):
            longer = any(len(o) > len(cand) and o.startswith(cand) for o in self.options)
            return ("S", cand) if longer or cand not in self.options else _DONE
        return _EXIT if local in self.options else None

    def min_rest(self, local: str) -> int:
        if local in self.options:
            return 0
        return min(len(o) - len(local) for o in self.options if o.startswith(local))


class _String(_Node):
    """A JSON string; local = (phase, count, esc) with esc 0 none, 1 after '\\', 10+k hex left."""

    def __init__(self, min_len: int, max_len: int):
        self.lo, self.hi = min_len, max(max_len, min_len)

    def start(self) -> tuple[int, int, int]:
        return (0, 0, 0)

    def step(self, local: tuple[int, int, int], ch: str) -> tuple | None:
        phase, count, esc = local
        if phase == 0:
            return ("S", (1, 0, 0)) if ch == '"' else None
        if esc == 1:
            if ch in '"\\/bfnrt':
                return ("S", (1, count + 1, 0))
            return ("S", (1, count, 14)) if ch == "u" else None
        if esc >= 10:
            if ch not in "0123456789abcdefABCDEF":
                return None
            return ("S", (1, count + (esc == 11), 0 if esc == 11 else esc - 1))
        if ch == '"':
            return _DONE if count >= self.lo else None
        if ch < " " or count >= self.hi:
            return None
        return ("S", (1, count, 1)) if ch == "\\" else ("S", (1, count + 1, 0))

    def min_rest(self, local: tuple[int, int, int]) -> int:
        phase, count, esc = local
        if phase == 0:
            return 2 + self.lo
        pending = 1 if esc == 1 else esc - 10 if esc >= 10 else 0
        return pending + max(0, self.lo - count - (1 if pending else 0)) + 1


class _Number(_Node):
    """A JSON number without exponent; local = (phase, digits)."""

    # phases: 0 start, 1 after '-', 2 integer digits, 3 after a leading 0, 4 after '.', 5 fraction
    def __init__(self, integer: bool, negative: bool):
        self.integer, self.negative = integer, negative

    def start(self) -> tuple[int, int]:
        return (0, 0)

    def step(self, local: tuple[int, int], ch: str) -> tuple | None:
        phase, digits = local
        if phase in (0, 1):
            if ch == "-" and phase == 0 and self.negative:
                return ("S", (1, 0))
            if ch.isdigit() and ch.isascii():
                return ("S", (3, 1) if ch == "0" else (2, 1))
            return None
        if ch.isdigit() and ch.isascii():
            if phase == 2 and digits < 15:
                return ("S", (2, digits + 1))
            if phase in (4, 5) and digits < 6:
                return ("S", (5, digits + 1))
            return _EXIT if phase != 4 else None
        if ch == "." and phase in (2, 3) and not self.integer:
            return ("S", (4, 0))
        return None if phase == 4 else _EXIT

    def min_rest(self, local: tuple[int, int]) -> int:
        return 1 if local[0] in (0, 1, 4) else 0


class _Array(_Node):
    """local = (phase, count, ws): 0 before '[', 1 after '[', 2 after an item, 3 after ','."""

    def __init__(self, item: int, item_len: int, lo: int, hi: int, ws_max: int):
        self.item, self.item_len = item, item_len
        self.lo, self.hi, self.ws_max = lo, max(hi, lo), ws_max

    def start(self) -> tuple[int, int, int]:
        return (0, 0, 0)

    def step(self, local: tuple[int, int, int], ch: str) -> tuple | None:
        phase, count, ws = local
        if phase == 0:
            return ("S", (1, 0, 0)) if ch == "[" else None
        if ch in _WS:
            return ("S", (phase, count, ws + 1)) if ws < self.ws_max else None
        if phase == 2:
            if ch == "," and count < self.hi:
                return ("S", (3, count, 0))
            return _DONE if ch == "]" and count >= self.lo else None
        if phase == 1 and ch == "]":
            return _DONE if self.lo == 0 else None
        if count >= self.hi:
            return None
        return ("P", (2, count + 1, 0), self.item)

    def min_rest(self, local: tuple[int, int, int]) -> int:
        phase, count, _ = local
        per = self.item_len + 1  # an item and its comma
        if phase == 0:
            return 2 + max(0, self.lo * per - 1)
        if phase == 1:
            return 1 + max(0, self.lo * per - 1)
        if phase == 2:
            return 1 + max(0, self.lo - count) * per
        return self.item_len + 1 + max(0, self.lo - count - 1) * per


class _Object(_Node):
    """local = (phase, i, pos, ws): 0 before '{', 1 in key literal i at pos, 3 before value i,
    4 after value i."""

    def __init__(self, keys: list[str], children: list[int], child_lens: list[int], ws_max: int):
        self.lits = [json.dumps(k) + ":" for k in keys]
        self.children, self.child_lens, self.ws_max = children, child_lens, ws_max
        n = len(keys)
        # rest[i] = chars after value i: ',' + key + value for each later key, then '}'.
        self.rest = [
            1 + sum(1 + len(self.lits[j]) + child_lens[j] for j in range(i + 1, n))
            for i in range(n)
        ]

    def start(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)

    def step(self, local: tuple[int, int, int, int], ch: str) -> tuple | None:
        phase, i, pos, ws = local
        if phase == 0:
            return ("S", (1, 0, 0, 0)) if ch == "{" else None
        if phase == 1:
            if pos == 0 and ch in _WS:
                return ("S", (1, i, 0, ws + 1)) if ws < self.ws_max else None
            if not self.lits:
                return _DONE if ch == "}" else None
            lit = self.lits[i]
            if ch != lit[pos]:
                return None
            return ("S", (3, i, 0, 0) if pos + 1 == len(lit) else (1, i, pos + 1, 0))
        if ch in _WS:
            return ("S", (phase, i, 0, ws + 1)) if ws < self.ws_max else None
        if phase == 3:
            return ("P", (4, i, 0, 0), self.children[i])
        if ch == "," and i + 1 < len(self.lits):
            return ("S", (1, i + 1, 0, 0))
        return _DONE if ch == "}" and i + 1 == len(self.lits) else None

    def min_rest(self, local: tuple[int, int, int, int]) -> int:
        phase, i, pos, _ = local
        if not self.lits:
            return 2 if phase == 0 else 1
        if phase == 0:
            return 1 + len(self.lits[0]) + self.child_lens[0] + self.rest[0]
        if phase == 1:
            return len(self.lits[i]) - pos + self.child_lens[i] + self.rest[i]
        if phase == 3:
            return self.child_lens[i] + self.rest[i]
        return self.rest[i]


class JsonGrammar:
    """Compiled schema: `initial()`, `advance`, `feed`, `is_complete`, `min_rest`.

    Args:
        schema: JSON schema (supported subset; see module docstring).
        max_string: Length cap of strings without maxLength (keeps generation finite).
        max_items: Item cap of arrays without maxItems.
        ws_max: Whitespace characters allowed per structural gap.

    Raises:
        ValueError: The schema uses unsupported keywords or types.
    """

    def __init__(
        self, schema: dict[str, Any], max_string: int = 2000, max_items: int = 16, ws_max: int = 16
    ):
        check_supported(schema)
        self.max_string, self.max_items, self.ws_max = max_string, max_items, ws_max
        self.nodes: list[_Node] = []
        self.root = self._compile(schema)

    def _add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _compile(self, s: dict[str, Any]) -> int:
        if "const" in s:
            return self._add(_Literal([json.dumps(s["const"])]))
        if "enum" in s:
            return self._add(_Literal([json.dumps(v) for v in s["enum"]]))
        typ = s.get("type")
        if isinstance(typ, list):
            non_null = [t for t in typ if t != "null"]
            if len(non_null) != 1:
                raise ValueError(f"constrained decoding supports one non-null type, got {typ}")
            typ = non_null[0]
        if typ == "object" or (typ is None and "properties" in s):
            props = s.get("properties", {})
            keys = [k for k in props if k in s.get("required", list(props))]
            children = [self._compile(props[k]) for k in keys]
            lens = [self.nodes[c].min_len() for c in children]
            return self._add(_Object(keys, children, lens, self.ws_max))
        if typ == "array":
            item = self._compile(s.get("items", {"type": "string"}))
            hi = s.get("maxItems", max(self.max_items, s.get("minItems", 0)))
            node = _Array(item, self.nodes[item].min_len(), s.get("minItems", 0), hi, self.ws_max)
            return self._add(node)
        if typ == "string":
            hi = s.get("maxLength", max(self.max_string, s.get("minLength", 0)))
            return self._add(_String(s.get("minLength", 0), hi))
        if typ in ("integer", "number"):
            negative = s.get("minimum", -1) < 0
            return self._add(_Number(typ == "integer", negative))
        if typ == "boolean":
            return self._add(_Literal(["true", "false"]))
        if typ == "null":
            return self._add(_Literal(["null"]))
        raise ValueError(f"constrained decoding cannot handle schema type {typ!r}")

    def initial(self) -> State:
        """The state before any character."""
        return ((self.root, self.nodes[self.root].start()),)

    def advance(self, state: State, ch: str) -> State | None:
        """Feed one character; None when it cannot continue a valid document."""
        stack = list(state)
        while stack:
            idx, local = stack[-1]
            res = self.nodes[idx].step(local, ch)
            if res is None:
                return None
            tag = res[0]
            if tag == "S":
                stack[-1] = (idx, res[1])
                return tuple(stack)
            stack.pop()
            if tag == "D":
                return tuple(stack)
            if tag == "P":
                stack.append((idx, res[1]))
                stack.append((res[2], self.nodes[res[2]].start()))
            # "X": the parent (or the pushed child) processes the same char
        return None  # characters after a complete document

    def feed(self, state: State | None, text: str) -> State | None:
        """Feed a string; None as soon as one character is rejected."""
        for ch in text:
            if state is None:
                return None
            state = self.advance(state, ch)
        return state

    def is_complete(self, state: State | None) -> bool:
        """True when the document is finished (a trailing number may still continue)."""
        if state is None:
            return False
        return all(self.nodes[i].min_rest(loc) == 0 for i, loc in state) and self._closable(state)

    def _closable(self, state: State) -> bool:
        # Only a bare top-level number can be "complete" while on the stack.
        return len(state) == 0 or (len(state) == 1 and isinstance(self.nodes[state[0][0]], _Number))

    def min_rest(self, state: State) -> int:
        """Fewest characters still needed to complete the document from `state`."""
        return sum(self.nodes[i].min_rest(loc) for i, loc in state)
