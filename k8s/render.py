"""Render a kustomization of this package without kustomize: ``python k8s/render.py DIR``.

Implements exactly the subset of kustomize that k8s/ uses, and refuses everything else,
so a kustomization that renders here renders the same with ``kubectl kustomize``:

- ``resources``: YAML files and directories holding a kustomization;
- ``namespace``: set on every namespaced object (cluster-scoped kinds are left alone);
- ``labels`` with ``pairs`` only (metadata labels; selectors and templates untouched);
- ``images``: ``name`` with ``newName``/``newTag``/``digest``, on pod templates' containers;
- ``secretGenerator`` with ``literals``, under ``generatorOptions.disableNameSuffixHash``
  (the name hash and the reference rewriting it needs are not implemented);
- ``patches``: JSON 6902 operations (inline ``patch`` or ``path``) on a ``target`` named
  by ``kind`` and ``name``.

The tests (tests/test_k8s_package.py) render every overlay with it; operators use
``kubectl apply -k``.
"""

from __future__ import annotations

import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

SUPPORTED_KEYS = frozenset(
    {
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "labels",
        "images",
        "secretGenerator",
        "generatorOptions",
        "patches",
    }
)
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "PriorityClass",
        "StorageClass",
        "IngressClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)
# kustomize's default ("legacy") output order: what apply needs first comes first.
KIND_ORDER = (
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
)
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}


class RenderError(ValueError):
    """The kustomization is invalid or uses a feature this renderer does not implement."""


def render(directory: Path | str) -> list[Obj]:
    """Every object the kustomization in ``directory`` produces, in kustomize's order."""
    objects = _build(Path(directory))
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if key in seen:
            raise RenderError(f"two objects are {key}")
        seen.add(key)
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    return sorted(objects, key=lambda o: rank.get(o["kind"], len(KIND_ORDER)))


def _build(directory: Path) -> list[Obj]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory} has no kustomization.yaml")
    k = yaml.safe_load(path.read_text()) or {}
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{path}: unsupported kustomization fields {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")
    objects: list[Obj] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects += _build(target)
        elif target.is_file():
            objects += [d for d in yaml.safe_load_all(target.read_text()) if d]
        else:
            raise RenderError(f"{path}: resource {entry} does not exist")
    objects += _secrets(k, path)
    for patch in k.get("patches", []):
        _patch(objects, patch, directory, path)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if set(entry) - {"pairs"}:
            raise RenderError(f"{path}: labels support only 'pairs', got {sorted(entry)}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        _set_image(objects, image, path)
    return objects


def _secrets(k: Obj, path: Path) -> list[Obj]:
    generators = k.get("secretGenerator", [])
    options = k.get("generatorOptions", {})
    if set(options) - {"disableNameSuffixHash"}:
        raise RenderError(f"{path}: unsupported generatorOptions {sorted(options)}")
    if generators and not options.get("disableNameSuffixHash"):
        raise RenderError(f"{path}: secretGenerator needs generatorOptions.disableNameSuffixHash")
    out = []
    for gen in generators:
        if set(gen) - {"name", "literals", "type"}:
            raise RenderError(f"{path}: secretGenerator supports name/literals/type only")
        data = {}
        for literal in gen.get("literals", []):
            key, sep, value = literal.partition("=")
            if not sep:
                raise RenderError(f"{path}: literal {literal!r} is not KEY=VALUE")
            data[key] = base64.b64encode(value.encode()).decode()
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": gen["name"]},
                "type": gen.get("type", "Opaque"),
                "data": data,
            }
        )
    return out


def _patch(objects: list[Obj], patch: Obj, directory: Path, path: Path) -> None:
    target = patch.get("target") or {}
    if set(target) - {"kind", "name"} or not {"kind", "name"} <= set(target):
        raise RenderError(f"{path}: a patch target is named by kind and name only")
    if "patch" in patch:
        ops = yaml.safe_load(patch["patch"])
    elif "path" in patch:
        ops = yaml.safe_load((directory / patch["path"]).read_text())
    else:
        raise RenderError(f"{path}: a patch needs 'patch' or 'path'")
    if not isinstance(ops, list):
        raise RenderError(f"{path}: only JSON 6902 patches (a list of operations) are supported")
    kind, name = target["kind"], target["name"]
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(matches) != 1:
        raise RenderError(f"{path}: patch target {target} matches {len(matches)} objects")
    for op in ops:
        apply_operation(matches[0], op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_operation(doc: Obj, op: Obj) -> None:
    """One JSON 6902 operation (add, replace, remove, test) on ``doc``, in place."""
    kind = op.get("op")
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if kind == "test":
        current = node[int(last)] if isinstance(node, list) else node[last]
        if current != op["value"]:
            raise RenderError(f"test failed at {op['path']}: {current!r} != {op['value']!r}")
        return
    if isinstance(node, list):
        if kind == "add":
            index = len(node) if last == "-" else int(last)
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[int(last)] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last)]
        else:
            raise RenderError(f"unsupported JSON 6902 operation {kind!r}")
        return
    if kind in ("replace", "remove") and last not in node:
        raise RenderError(f"{kind} of a missing path {op['path']}")
    if kind in ("add", "replace"):
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise RenderError(f"unsupported JSON 6902 operation {kind!r}")


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job, ...), itself (not a copy);
    None for other kinds."""
    steps = POD_TEMPLATE_PATHS.get(obj["kind"])
    if steps is None:
        return None
    node: Any = obj
    for step in steps:
        node = node[step]
    result: Obj = node
    return result


def _set_image(objects: list[Obj], image: Obj, path: Path) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise RenderError(f"{path}: images support name/newName/newTag/digest only")
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name, tag = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{name}:{new_tag}" if new_tag else name


def _split_image(ref: str) -> tuple[str, str]:
    name = ref.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, ""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python k8s/render.py DIR   (a directory with a kustomization.yaml)")
        return 2
    try:
        objects = render(argv[0])
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
