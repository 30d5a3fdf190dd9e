"""What the API server does to a custom resource on create, for the tests: defaulting, schema, CEL.

Steps, in the apiserver's order (k8s.io/apiextensions-apiserver: ``structuraldefaulting.Default``,
then OpenAPI schema validation, then ``x-kubernetes-validations``):

1. **structural defaulting** — for every object present, each absent property whose schema has a
   ``default`` gets a deep copy of it, recursively (a defaulted ``{}`` then gets its own properties'
   defaults);
2. **schema validation** (jsonschema on the OpenAPI v3 schema, unknown fields rejected);
3. **CEL** — each ``x-kubernetes-validations`` rule of a node that is present is evaluated with
   ``self`` bound to that node, by Google's C++ CEL runtime (``cel-expr-python``). Values are typed by
   the schema (``type: number`` is a double even when written ``3``). A rule that evaluates to false
   rejects the object with the rule's message; a rule that fails to evaluate (e.g. selecting a field
   that is absent: ``no such key``) rejects it too, with the evaluation error, as the apiserver does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import jsonschema
from cel_expr_python import cel

from deepspec.operator.crd import build_crd, openapi_to_jsonschema

_ENV = cel.NewEnv(variables={"self": cel.Type.DYN})


@dataclass(frozen=True)
class Rejection:
    path: str
    message: str


def crd_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def default(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting of ``obj`` in place (and returned)."""
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
        for key, value in obj.items():
            if key in props:
                default(value, props[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                default(value, schema["additionalProperties"])
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for item in obj:
            default(item, schema["items"])
    return obj


def typed(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` with numbers typed by the schema (CEL distinguishes int from double)."""
    if value is None:
        return None
    kind = schema.get("type")
    if kind == "number":
        return float(value)
    if kind == "integer":
        return int(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = (
            schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        )
        return {k: typed(v, props.get(k, extra)) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v, schema.get("items") or {}) for v in value]
    return value


def cel_rejections(obj: Any, schema: dict[str, Any], path: str = "") -> list[Rejection]:
    """Every failing (or erroring) CEL rule under ``schema`` for the present nodes of ``obj``."""
    out: list[Rejection] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        result = _ENV.compile(rule["rule"]).eval(data={"self": typed(obj, schema)})
        where = path + rule.get("fieldPath", "")
        if result.type() == cel.Type.ERROR:
            out.append(Rejection(path or ".", f"evaluation error: {result.value()}"))
        elif result.value() is not True:
            out.append(Rejection(where or ".", rule["message"]))
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj and obj[key] is not None:
                out += cel_rejections(obj[key], sub, f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += cel_rejections(item, schema["items"], f"{path}[{i}]")
    return out


def admit(resource: dict[str, Any]) -> tuple[dict[str, Any], list[Rejection]]:
    """(the stored object after defaulting, the reasons the API server would reject it)."""
    schema = crd_schema()
    obj = default(copy.deepcopy(resource), schema)
    validator = jsonschema.Draft4Validator(openapi_to_jsonschema(schema))
    errors = [
        Rejection("." + ".".join(map(str, e.absolute_path)), f"schema: {e.message}")
        for e in validator.iter_errors(obj)
    ]
    if errors:
        return obj, errors
    return obj, cel_rejections(obj, schema)
