"""Load response schemas from the Matrix specification's OpenAPI files.

The spec's client-server API lives in ``data/api/client-server/*.yaml``
(OpenAPI 3.1). Schemas there point at other files with relative ``$ref``
(``definitions/...``, ``../../event-schemas/...``) and inside a file with
``#/...`` JSON pointers. ``Spec.response_schema`` returns the schema of one
response with every ``$ref`` inlined, ready for a JSON Schema 2020-12
validator (OpenAPI 3.1 schemas are JSON Schema 2020-12; extension keywords
such as ``x-example`` are unknown keywords and are ignored).

CI places ``shared/`` beside the repository, so the spec is found at
``<repo>/../shared/matrix-spec/data``; ``ZHOME_MATRIX_SPEC_DATA`` overrides.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def spec_data_dir() -> Path:
    override = os.environ.get("ZHOME_MATRIX_SPEC_DATA")
    if override:
        return Path(override).resolve()
    return (REPO_ROOT / ".." / "shared" / "matrix-spec" / "data").resolve()


class Spec:
    def __init__(self, data_dir: Optional[Path] = None) -> None:
        self.data_dir = data_dir or spec_data_dir()
        self.cs_dir = self.data_dir / "api" / "client-server"
        if not self.cs_dir.is_dir():
            raise FileNotFoundError(f"Matrix spec not found at {self.cs_dir}")
        self._files: dict[Path, Any] = {}
        self._resolved: dict[tuple[Path, str], Any] = {}
        # (path template, method) -> (file, operation)
        self._operations: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
        for f in sorted(self.cs_dir.glob("*.yaml")):
            doc = self._load(f)
            for template, item in (doc.get("paths") or {}).items():
                for method, op in item.items():
                    if isinstance(op, dict) and "responses" in op:
                        self._operations[(template, method.lower())] = (f, op)

    def _load(self, path: Path) -> Any:
        path = path.resolve()
        if path not in self._files:
            with open(path, encoding="utf-8") as fh:
                self._files[path] = yaml.safe_load(fh)
        return self._files[path]

    @staticmethod
    def _pointer(doc: Any, pointer: str) -> Any:
        node = doc
        for part in [p for p in pointer.lstrip("/").split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def _resolve_ref(self, base: Path, ref: str, stack: tuple[tuple[Path, str], ...]) -> Any:
        file_part, _, pointer = ref.partition("#")
        target = (base.parent / file_part).resolve() if file_part else base.resolve()
        key = (target, pointer)
        if key in self._resolved:
            return self._resolved[key]
        if key in stack:
            # A recursive schema: accept anything below the loop.
            return {}
        node = self._pointer(self._load(target), pointer)
        out = self._inline(target, node, stack + (key,))
        self._resolved[key] = out
        return out

    def _inline(self, base: Path, node: Any, stack: tuple[tuple[Path, str], ...] = ()) -> Any:
        """``node`` (from file ``base``) with every $ref replaced by its target."""
        if isinstance(node, list):
            return [self._inline(base, n, stack) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = self._resolve_ref(base, str(node["$ref"]), stack)
            siblings = {k: self._inline(base, v, stack) for k, v in node.items() if k != "$ref"}
            if not siblings:
                return target
            return {"allOf": [target], **siblings}
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k in ("example", "examples") or k.startswith("x-"):
                # Examples are data, not schema; they may hold "$ref"-like keys.
                out[k] = copy.deepcopy(v)
            else:
                out[k] = self._inline(base, v, stack)
        return out

    def operation(self, template: str, method: str) -> tuple[Path, dict[str, Any]]:
        try:
            return self._operations[(template, method.lower())]
        except KeyError:
            raise KeyError(f"no operation {method.upper()} {template} in the spec") from None

    def response_schema(self, template: str, method: str, status: int) -> dict[str, Any]:
        path, op = self.operation(template, method)
        responses = op["responses"]
        resp = responses.get(str(status), responses.get(status))
        if resp is None:
            raise KeyError(f"{method.upper()} {template} documents no {status} response")
        resp = self._inline(path, resp)
        # A response that was a $ref with a description sibling arrives as allOf.
        while "content" not in resp and "allOf" in resp:
            resp = {**resp["allOf"][0], **{k: v for k, v in resp.items() if k != "allOf"}}
        try:
            return resp["content"]["application/json"]["schema"]
        except KeyError:
            raise KeyError(f"{method.upper()} {template} {status} documents no JSON body") from None

    def validate(self, body: Any, template: str, method: str, status: int) -> None:
        """Assert that ``body`` is what the spec documents for that response."""
        import jsonschema

        errors = list(jsonschema.Draft202012Validator(self.response_schema(template, method, status))
                      .iter_errors(body))
        assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]

    def schema_file(self, relative: str) -> dict[str, Any]:
        """A schema file (e.g. ``definitions/errors/error.yaml``) with refs inlined."""
        path = (self.cs_dir / relative).resolve()
        return self._inline(path, self._load(path))
