"""`kubectl kustomize k8s/` in Python, for the features k8s/kustomization.yaml uses, so the manifests
can be checked as they are applied where kubectl is not installed.

Supported: resources (files), images (name -> newName/newTag in every containers/initContainers
list), configMapGenerator (literals; disableNameSuffixHash; the local-config annotation drops it
from the output), replacements (a ConfigMap data key into fieldPaths with `*`, `[key=value]` and
`[dotted.key]` elements). Anything else in the kustomization is an error here, so the kustomization
cannot grow a feature these tests would silently ignore. test_k8s_manifests.py compares the result
with `kubectl kustomize` when kubectl is there.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "configMapGenerator", "replacements"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"


def split_field_path(path: str) -> list[str]:
    """`a.b.[x.y/z].*` -> ["a", "b", "[x.y/z]", "*"]: dots inside brackets do not split."""
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)


def walk(node, parts: list[str]):
    """Yield (parent, key) for every place `parts` leads to; raise KeyError where it leads nowhere."""
    head, rest = parts[0], parts[1:]
    if head == "*":
        keys = list(range(len(node))) if isinstance(node, list) else list(node)
    elif head.startswith("[") and "=" in head:
        field, value = head[1:-1].split("=", 1)
        keys = [i for i, item in enumerate(node) if str(item.get(field)) == value]
    else:
        keys = [head[1:-1] if head.startswith("[") else head]
    for key in keys:
        if isinstance(node, dict) and key not in node:
            raise KeyError(f"no field {key!r}")
        if rest:
            yield from walk(node[key], rest)
        else:
            yield node, key


def set_image(doc, image: dict) -> None:
    """The images transformer: every container image named image["name"] (any tag) is replaced."""
    if isinstance(doc, list):
        for item in doc:
            set_image(item, image)
        return
    if not isinstance(doc, dict):
        return
    for key, value in doc.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, _, tag = container.get("image", "").partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        else:
            set_image(value, image)


def generated_config_map(generator: dict) -> dict:
    assert set(generator) <= {"name", "literals", "options"}, f"unsupported configMapGenerator keys: {generator}"
    options = generator.get("options", {})
    assert options.get("disableNameSuffixHash"), "name suffix hashes are not emulated"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"], "annotations": options.get("annotations", {})},
        "data": dict(item.split("=", 1) for item in generator.get("literals", [])),
    }


def matches(doc: dict, select: dict) -> bool:
    assert set(select) <= {"kind", "name"}, f"unsupported select: {select}"
    return doc["kind"] == select["kind"] and doc["metadata"]["name"] == select.get("name", doc["metadata"]["name"])


def replace(docs: list[dict], replacement: dict) -> None:
    source = replacement["source"]
    (origin,) = [d for d in docs if matches(d, {k: v for k, v in source.items() if k != "fieldPath"})]
    ((parent, key),) = walk(origin, split_field_path(source["fieldPath"]))
    for target in replacement["targets"]:
        selected = [d for d in docs if matches(d, target["select"])]
        assert selected, f"replacement target {target['select']} selects nothing"
        for doc in selected:
            for path in target["fieldPaths"]:
                for place, field in walk(doc, split_field_path(path)):
                    place[field] = parent[key]


def render_kustomization(folder: Path) -> list[dict]:
    """The resources `kubectl kustomize folder` prints, as dicts."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED
    assert not unsupported, f"kustomization uses {unsupported}: extend tests/deploy/test_k8s_kustomize.py"
    docs = [
        copy.deepcopy(doc)
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((folder / name).read_text())
        if doc
    ]
    docs += [generated_config_map(g) for g in kustomization.get("configMapGenerator", [])]
    for image in kustomization.get("images", []):
        set_image(docs, image)
    for replacement in kustomization.get("replacements", []):
        replace(docs, replacement)
    return [d for d in docs if d["metadata"].get("annotations", {}).get(LOCAL_CONFIG) != "true"]


# ---------------------------------------------------------------- the renderer's own checks


def test_field_paths_split_like_kustomize():
    assert split_field_path("spec.a.*.b.[nvidia.com/gpu.product]") == [
        "spec",
        "a",
        "*",
        "b",
        "[nvidia.com/gpu.product]",
    ]
    assert split_field_path("spec.containers.[name=ray-head].image") == [
        "spec",
        "containers",
        "[name=ray-head]",
        "image",
    ]


def test_renderer_applies_images_and_replacements(tmp_path):
    (tmp_path / "a.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": {"name": "c"},
                "spec": {
                    "headGroupSpec": {"template": {"spec": {"containers": [{"name": "h", "image": "app:1"}]}}},
                    "workerGroupSpecs": [
                        {"template": {"spec": {"nodeSelector": {"gpu.type": "old"}, "containers": [{"image": "app"}]}}},
                        {
                            "template": {
                                "spec": {"nodeSelector": {"gpu.type": "old"}, "containers": [{"image": "other:2"}]}
                            }
                        },
                    ],
                },
            }
        )
    )
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["a.yaml"],
                "images": [{"name": "app", "newName": "reg/app", "newTag": "9"}],
                "configMapGenerator": [
                    {
                        "name": "s",
                        "literals": ["gpu=new"],
                        "options": {"disableNameSuffixHash": True, "annotations": {LOCAL_CONFIG: "true"}},
                    }
                ],
                "replacements": [
                    {
                        "source": {"kind": "ConfigMap", "name": "s", "fieldPath": "data.gpu"},
                        "targets": [
                            {
                                "select": {"kind": "RayCluster"},
                                "fieldPaths": ["spec.workerGroupSpecs.*.template.spec.nodeSelector.[gpu.type]"],
                            }
                        ],
                    }
                ],
            }
        )
    )
    (doc,) = render_kustomization(tmp_path)
    workers = doc["spec"]["workerGroupSpecs"]
    assert doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "reg/app:9"
    assert [w["template"]["spec"]["containers"][0]["image"] for w in workers] == ["reg/app:9", "other:2"]
    assert [w["template"]["spec"]["nodeSelector"] for w in workers] == [{"gpu.type": "new"}] * 2


def test_renderer_refuses_what_it_does_not_emulate(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(AssertionError, match="patches"):
        render_kustomization(tmp_path)
