"""`kustomize build` for the few kustomize features k8s/ uses, so the tests can check what users
apply (`kubectl apply -k k8s/overlays/example`) on machines without kubectl or kustomize.

Supported, with kustomize's semantics: `resources` (files and directories), `namespace` (sets
metadata.namespace of namespaced objects and renames the Namespace object), `images` (name,
newName, newTag, digest; like kustomize, in every `containers`/`initContainers` list at any depth,
custom resources included) and `configMapGenerator` with `literals` under
`generatorOptions.disableNameSuffixHash: true`. Any other field is an error, so a manifest that
starts using more of kustomize fails here instead of being rendered wrongly. tests/test_k8s.py
compares the result with `kubectl kustomize` where kubectl is installed.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

_SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "generatorOptions"}
# Kinds that are not namespaced among those k8s/ could contain.
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                   "PriorityClass", "StorageClass", "PersistentVolume"}


class UnsupportedKustomization(Exception):
    pass


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build directory` prints (in file order, not kustomize's kind order)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unknown = set(kustomization) - _SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)} not supported by {__name__}")
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedKustomization(f"{directory}: kind {kustomization['kind']}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources") or []:
        path = directory / entry
        if path.is_dir():
            objects += build(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    objects += _generated(directory, kustomization)
    if "namespace" in kustomization:
        _set_namespace(objects, kustomization["namespace"])
    for image in kustomization.get("images") or []:
        for obj in objects:
            _set_image(obj, image)
    return objects


def _generated(directory: Path, kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    generators = kustomization.get("configMapGenerator") or []
    if generators and not (kustomization.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise UnsupportedKustomization(f"{directory}: name suffix hashes are not implemented")
    made = []
    for generator in generators:
        if set(generator) - {"name", "literals"}:
            raise UnsupportedKustomization(f"{directory}: configMapGenerator {sorted(generator)}")
        data = dict(literal.split("=", 1) for literal in generator.get("literals") or [])
        made.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    return made


def _set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        elif obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            raise UnsupportedKustomization("namespace with role bindings (subjects) is not implemented")
        elif obj["kind"] not in _CLUSTER_SCOPED:
            obj.setdefault("metadata", {})["namespace"] = namespace


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, digest = (image.split("@", 1) + [None])[:2]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:], digest
    return name, None, digest


def _set_image(node: Any, rule: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _rewrite(container["image"], rule)
            _set_image(value, rule)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, rule)


def _rewrite(image: str, rule: dict[str, str]) -> str:
    name, tag, digest = _split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    tag = rule.get("newTag", tag)
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest and "newTag" not in rule else "")


def copy_overlay(overlay: Path, target: Path, **changes: Any) -> Path:
    """A copy of an overlay's kustomization.yaml in `target`, its resources re-pointed (kustomize
    takes only relative paths), with top-level fields replaced: how a user adapts the example."""
    kustomization = copy.deepcopy(yaml.safe_load((overlay / "kustomization.yaml").read_text()))
    target.mkdir(parents=True, exist_ok=True)
    kustomization["resources"] = [os.path.relpath((overlay / entry).resolve(), target.resolve())
                                  for entry in kustomization["resources"]]
    kustomization.update(changes)
    (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return target
