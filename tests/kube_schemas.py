"""Strict, offline schema validation of Kubernetes objects, as ``kubectl apply --validate=strict`` would do it.

* ``ray.io`` objects validate against KubeRay's own CRDs (``../shared/schemas/kuberay``, read in
  place, never copied): the served storage version's ``openAPIV3Schema``. Plain JSON Schema
  lets any unnamed field through, while the API server prunes it (or, strict, rejects it), so
  :func:`close` forbids every field a structural schema does not name, and the Kubernetes
  extensions get their meaning: ``x-kubernetes-int-or-string`` (an integer or a string),
  ``x-kubernetes-preserve-unknown-fields`` (stays open), ``x-kubernetes-embedded-resource``
  (apiVersion, kind, ObjectMeta), ``x-kubernetes-list-type`` map/set (unique keys/items),
  ``nullable``. ``x-kubernetes-map-type`` only says how merges work: nothing to check.
  CEL rules (``x-kubernetes-validations``) cannot be evaluated here, so a manifest that sets a
  field carrying one is an error rather than silently unchecked. The top-level ``metadata``,
  which the API server checks itself, gets an ObjectMeta schema.
* Core kinds (and the pod templates inside the ray.io objects, as ``PodTemplate``\\ s) validate
  with ``kubernetes-validate``'s strict schemas for :data:`KUBERNETES_VERSION`, which ship in
  the package (no download).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterator

import jsonschema
import yaml

from support import SHARED

KUBERAY = SHARED / "schemas" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
KUBERNETES_VERSION = "1.37"  # the newest release kubernetes-validate ships schemas for
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_KEY = rf"^({_DNS_LABEL}(\.{_DNS_LABEL})*/)?{_QUALIFIED}$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {  # metav1.ObjectMeta as a manifest may write it
    "type": "object", "additionalProperties": False,
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"},
        "generateName": {"type": "string", "maxLength": 248, "pattern": r"^[a-z0-9][-a-z0-9.]*$"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": rf"^{_DNS_LABEL}$"},
        "labels": {"type": "object", "additionalProperties": False, "patternProperties": {
            _LABEL_KEY: {"type": "string", "maxLength": 63, "pattern": rf"^({_QUALIFIED})?$"}}},
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def close(schema: dict) -> dict:
    """``schema`` with every object closed to the fields it names, and the x-kubernetes-* extensions applied.

    Sub-schemas of allOf/anyOf/oneOf/not are left as they are: in a structural schema they may
    only restate what the enclosing schema names, so closing them would forbid its fields.
    """
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: close(sub) for name, sub in schema["properties"].items()}
    if isinstance(schema.get("items"), dict):
        out["items"] = close(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = close(schema["additionalProperties"])
    elif _is_closed_object(schema):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema and "anyOf" not in schema:
        out["anyOf"] = INT_OR_STRING
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-embedded-resource"):
        out["properties"] = out.get("properties", {}) | {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": OBJECT_META}
        out["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
    return out


def _is_closed_object(schema: dict) -> bool:
    """An object the API server would prune unnamed fields from (one without properties keeps none)."""
    is_object = "properties" in schema or schema.get("type") == "object"
    return (is_object and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields"))


def _list_type(validator, list_type: str, instance, schema: dict) -> Iterator[jsonschema.ValidationError]:
    """``map``: items unique by their map keys (a missing key takes its default); ``set``: unique items."""
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        fields = schema.get("items", {}).get("properties", {})
        keys = [json.dumps([item.get(n, fields.get(n, {}).get("default")) for n in names]) for item in instance
                if isinstance(item, dict)]
    for key, count in Counter(keys).items():
        if count > 1:
            yield jsonschema.ValidationError(f"{count} entries share the {list_type} key {key}")


def _cel_rules(validator, rules: list, instance, schema: dict) -> Iterator[jsonschema.ValidationError]:
    yield jsonschema.ValidationError("this field carries CEL rules that are not evaluated offline: "
                                     + "; ".join(rule["rule"] for rule in rules))


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The strict validator of a KubeRay kind: its CRD's served storage version, apiVersion and kind pinned."""
    crd = yaml.load((KUBERAY / CRDS[kind]).read_text(), Loader=_LOADER)  # ~1 MB each: libyaml when there
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    schema = close(version["schema"]["openAPIV3Schema"])
    schema["properties"] |= {"apiVersion": {"enum": [f"{crd['spec']['group']}/{version['name']}"]},
                             "kind": {"enum": [kind]}, "metadata": OBJECT_META}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return KubernetesValidator(schema)


def crd_errors(document: dict) -> list[str]:
    """Every way ``document`` breaks its kind's CRD, as ``path: message`` lines (empty: it validates)."""
    errors = crd_validator(document["kind"]).iter_errors(document)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def core_errors(document: dict) -> list[str]:
    """``document`` against Kubernetes' own strict schemas (kubernetes-validate, offline)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '<root>'}: {error.message}"]
    return []


def pod_template(template: dict, name: str) -> dict:
    """A PodTemplateSpec inside a ray.io object, wrapped as the core PodTemplate kind so it can be validated."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
