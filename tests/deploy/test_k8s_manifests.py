"""The KubeRay manifests in k8s/ and the launcher config in cluster/, checked offline (no Kubernetes).

Every resource, as `kubectl apply -k k8s/` sends it, is validated against the KubeRay v1.7.0 CRDs
the way the API server would with `kubectl --validate=strict` (test_k8s_schema.py), and against
the operator's own rules. Then the pod conventions (non-root, /dev/shm, the PVC, the hub token,
GPU requests = limits), and agreement with the configs the jobs run: entrypoints, GPUs and CPUs
per worker, the Serve application. Last, the Ray cluster launcher config and the runtime_env.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from test_k8s_kustomize import render_kustomization
from test_k8s_schema import CRD_FILES, cluster_spec, load, operator_errors, schema_errors

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-batch.yaml", "rayservice-chat.yaml"]
IMAGE_DIR = "/home/ray/mistral-qa"  # the image's copy of the repository (k8s/Dockerfile WORKDIR)
SHARED = "/mnt/shared"  # where every pod mounts the PVC
GPU = "nvidia.com/gpu"
MIN_MEMORY_PER_GPU_GIB = 32  # a fp16 7B base (~14.5 GB) passes through host memory on load


# ---------------------------------------------------------------- the manifests as applied


@functools.cache
def rendered() -> dict[str, dict]:
    """What `kubectl apply -k k8s/` sends, by "Kind/name" (the kustomization rendered in Python)."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in render_kustomization(K8S)}


def manifest(file: str) -> dict:
    (doc,) = [d for d in load_all(K8S / file)]
    return rendered()[f"{doc['kind']}/{doc['metadata']['name']}"]


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=yaml.SafeLoader) if d]


def pods(doc: dict) -> list[tuple[str, dict, dict]]:
    """(role, group, pod spec) of every Ray pod: head, worker groups, and the job submitter."""
    spec = cluster_spec(doc)
    found = [("head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"])]
    found += [(f"worker {g['groupName']}", g, g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        found.append(("submitter", {}, doc["spec"]["submitterPodTemplate"]["spec"]))
    return found


def gpu_groups(doc: dict) -> list[tuple[dict, dict]]:
    """(group, resources of its Ray container) of every worker group with GPUs."""
    groups = [
        (g, g["template"]["spec"]["containers"][0]["resources"]) for g in cluster_spec(doc).get("workerGroupSpecs", [])
    ]
    return [(g, r) for g, r in groups if GPU in r.get("limits", {})]


def quantity(text: str | int) -> float:
    """A Kubernetes quantity as a number (CPUs, or GiB for memory suffixes)."""
    text = str(text)
    units = {
        "m": 1e-3,
        "Ki": 2**-20,
        "Mi": 2**-10,
        "Gi": 1,
        "Ti": 2**10,
        "K": 1e3 / 2**30,
        "M": 1e6 / 2**30,
        "G": 1e9 / 2**30,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def pyproject_ray_version() -> str:
    (version,) = re.findall(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    return version


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- schema validation


@pytest.mark.parametrize("file", MANIFESTS)
def test_manifest_validates_against_kuberay_crds(file):
    doc = manifest(file)
    assert schema_errors(doc) == []
    assert operator_errors(doc) == []


def test_kustomization_renders_the_settings_everywhere():
    docs = rendered()
    ray_docs = [d for d in docs.values() if d["kind"] in CRD_FILES]
    assert {d["metadata"]["name"] for d in ray_docs} == {load_all(K8S / f)[0]["metadata"]["name"] for f in MANIFESTS}
    kustomization = load(K8S.joinpath("kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    settings = dict(item.split("=", 1) for item in kustomization["configMapGenerator"][0]["literals"])
    wanted_image = f"{image['newName']}:{image['newTag']}"
    for doc in ray_docs:
        for role, _, pod in pods(doc):
            assert {c["image"] for c in pod["containers"]} == {wanted_image}, f"{doc['metadata']['name']} {role}"
        for group, _ in gpu_groups(doc):
            assert group["template"]["spec"]["nodeSelector"] == {f"{GPU}.product": settings["gpuProduct"]}
    pvc = docs["PersistentVolumeClaim/mistral-qa-shared"]
    assert pvc["spec"]["storageClassName"] == settings["storageClass"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == settings["storageSize"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes write to it
    assert "ConfigMap/mistral-qa-settings" not in docs  # local-config: only the replacements' source


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed")
def test_python_rendering_matches_kubectl_kustomize():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
    by_kubectl = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out) if d}
    assert by_kubectl == rendered()


MUTATIONS = {  # name: (path, value, what the error says)
    "typo in a RayJob field": ("spec.shutdownAfterJobFinish", True, "'shutdownAfterJobFinish' was unexpected"),
    "string for an integer": ("spec.backoffLimit", "two", "is not of type 'integer'"),
    "typo in the pod template": (
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.volumeMount",
        [],
        "'volumeMount' was unexpected",
    ),
    "string for replicas": ("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "2", "is not of type 'integer'"),
    "object for a string": (
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.image",
        {},
        "not of type 'string'",
    ),
    "unknown submissionMode": ("spec.submissionMode", "K8sMode", "submissionMode"),
    "name too long": ("metadata.name", "mistral-qa-" + "x" * 40, "at most 47 characters"),
    "ttl without shutdown": ("spec.shutdownAfterJobFinishes", False, "needs shutdownAfterJobFinishes"),
}


def set_path(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
    return doc


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_broken_manifest_is_rejected(mutation):
    path, value, message = MUTATIONS[mutation]
    broken = set_path(manifest("rayjob-train.yaml"), path, value)
    errors = schema_errors(broken) or operator_errors(broken)  # operator rules assume a schema-valid doc
    assert any(message in e for e in errors), errors


def test_defaulted_required_fields_may_be_left_out():
    """minReplicas/maxReplicas are required but defaulted: the API server accepts them absent."""
    doc = copy.deepcopy(manifest("rayjob-train.yaml"))
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"], group["replicas"]
    assert schema_errors(doc) == []


# ---------------------------------------------------------------- pods, images, storage, GPUs


@pytest.mark.parametrize("file", MANIFESTS)
def test_every_ray_pod_follows_the_conventions(file):
    doc = manifest(file)
    assert cluster_spec(doc)["rayVersion"] == pyproject_ray_version()
    assert cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for role, _, pod in pods(doc):
        where = f"{file} {role}"
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, where
        container = pod["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
        if role == "submitter":
            continue
        assert container["workingDir"] == IMAGE_DIR, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
        assert mounts[SHARED]["persistentVolumeClaim"]["claimName"] == "mistral-qa-shared", where
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}, where
        assert env["HF_HOME"]["value"].startswith(SHARED), where  # the 14 GB base downloads once
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], where  # Guaranteed QoS; GPUs must match anyway


@pytest.mark.parametrize("file", MANIFESTS)
def test_gpu_groups_are_schedulable_and_sized_per_gpu(file):
    groups = gpu_groups(manifest(file))
    assert groups, f"{file} has no GPU worker group"
    for group, resources in groups:
        spec = group["template"]["spec"]
        gpus = int(resources["limits"][GPU])
        assert resources["requests"][GPU] == resources["limits"][GPU]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert quantity(resources["limits"]["memory"]) / gpus >= MIN_MEMORY_PER_GPU_GIB
        assert "num-gpus" not in group["rayStartParams"]  # Ray reads the GPU limit itself


def test_image_matches_the_ray_version_of_pyproject():
    version = pyproject_ray_version()
    base = f"rayproject/ray:{version}-py311-gpu"
    assert f"FROM {base}" in (K8S / "Dockerfile").read_text().splitlines()
    assert load((ROOT / "cluster" / "aws-gpu.yaml").read_text())["docker"]["image"] == base
    workdir = [line.split()[1] for line in (K8S / "Dockerfile").read_text().splitlines() if line.startswith("WORKDIR")]
    assert workdir == [IMAGE_DIR]


# ---------------------------------------------------------------- agreement with the configs


def job_config(entrypoint: str):
    """(module, config) of a `python -m train|batch --config ... overrides` entrypoint, loaded and
    validated as the job will load it; the image's paths are mapped onto this checkout."""
    from mistral_qa.configio import load_config

    args = shlex.split(entrypoint)
    assert args[:2] == ["python", "-m"], entrypoint
    module = args[2]
    assert (ROOT / module / "__main__.py").is_file(), f"no module {module}"
    options = dict(zip(args[3::2], args[4::2], strict=False))
    assert (ROOT / options["--config"]).is_file(), f"no config {options['--config']}"
    overrides = [a for a in args[3:] if "=" in a and not a.startswith("--")]
    if module == "train":
        from train.config import TrainJobConfig as cls
    else:
        cls = pytest.importorskip(f"{module}.config").BatchJobConfig
    cfg = load_config(cls, ROOT / options["--config"], overrides)
    for flag in ("--input", "--output"):
        if flag in options:
            path = options[flag]
            assert path.startswith(SHARED) or (ROOT / path.removeprefix(IMAGE_DIR + "/")).exists(), path
    return module, cfg


def trained_adapter() -> str:
    _, cfg = job_config(manifest("rayjob-train.yaml")["spec"]["entrypoint"])
    return f"{cfg.run.output_dir}/{cfg.run.name}/adapter"


def test_train_job_runs_the_reference_config_on_enough_gpus():
    doc = manifest("rayjob-train.yaml")
    _, cfg = job_config(doc["spec"]["entrypoint"])
    assert cfg.scaling.use_gpu and cfg.run.storage_path.startswith(SHARED) and cfg.run.output_dir.startswith(SHARED)
    (group, resources), *_ = gpu_groups(doc)
    gpus = int(resources["limits"][GPU])
    # A fixed group: Ray Train wants all its workers at once.
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    assert group["replicas"] * gpus >= cfg.scaling.num_workers
    assert quantity(resources["limits"]["cpu"]) >= gpus * cfg.scaling.cpus_per_worker
    assert doc["spec"]["shutdownAfterJobFinishes"] and doc["spec"]["ttlSecondsAfterFinished"] > 0
    assert doc["spec"]["activeDeadlineSeconds"] > 0 and doc["spec"]["backoffLimit"] >= 1
    assert doc["spec"]["submissionMode"] == "K8sJobMode"


def test_batch_job_reads_the_trained_adapter_on_enough_gpus():
    doc = manifest("rayjob-batch.yaml")
    _, cfg = job_config(doc["spec"]["entrypoint"])
    assert cfg.adapter == trained_adapter()
    (group, resources), *_ = gpu_groups(doc)
    gpus = int(resources["limits"][GPU])
    actors = cfg.compute.max_actors or cfg.compute.num_actors
    assert group["maxReplicas"] * gpus >= actors * cfg.compute.num_gpus_per_actor
    assert group["minReplicas"] * gpus >= cfg.compute.num_actors * cfg.compute.num_gpus_per_actor
    assert (
        quantity(resources["limits"]["cpu"]) >= gpus / cfg.compute.num_gpus_per_actor * cfg.compute.num_cpus_per_actor
    )
    assert cluster_spec(doc).get("enableInTreeAutoscaling") == (group["maxReplicas"] > group["minReplicas"])
    assert doc["spec"]["shutdownAfterJobFinishes"] and doc["spec"]["activeDeadlineSeconds"] > 0


def serve_config_v2() -> dict:
    return yaml.safe_load(manifest("rayservice-chat.yaml")["spec"]["serveConfigV2"])


def test_serve_config_v2_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config_v2())


def test_serve_config_v2_is_generated_from_serve_config():
    sync = load_module(K8S / "serve_config.py")
    assert serve_config_v2() == sync.k8s_serve_config(), "run: python k8s/serve_config.py"
    assert sync.main(["--check"]) == 0


def changed_paths(a, b, path=()) -> set[tuple]:
    """Paths where two configs differ (lists of named items compared by name)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {p for k in a.keys() | b.keys() for p in changed_paths(a.get(k), b.get(k), (*path, k))}
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(i, dict) and "name" in i for i in a + b):
        by_name = lambda items: {i["name"]: i for i in items}  # noqa: E731
        a, b = by_name(a), by_name(b)
        return {p for k in a.keys() | b.keys() for p in changed_paths(a.get(k), b.get(k), (*path, k))}
    return set() if a == b else {path}


def test_serve_config_v2_differs_from_serve_config_only_in_deployment_settings():
    """The same application: only where it listens, which adapter, and GPUs per replica change."""
    base = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    allowed = re.compile(
        r"http_options\.host|applications\.[^.]+\.args\.engine\.(adapters\..+|merge_adapter)"
        r"|applications\.[^.]+\.deployments\.[^.]+\.(ray_actor_options\..+|autoscaling_config\.max_replicas)"
    )
    changed = {".".join(p) for p in changed_paths(base, serve_config_v2())}
    assert changed and all(allowed.fullmatch(p) for p in changed), sorted(changed)


def test_chat_service_serves_the_trained_adapter_on_enough_gpus():
    doc = manifest("rayservice-chat.yaml")
    config = serve_config_v2()
    (app,) = config["applications"]
    assert list(app["args"]["engine"]["adapters"].values()) == [trained_adapter()]
    head = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": config["http_options"]["port"]} in head["ports"]
    assert config["http_options"]["host"] == "0.0.0.0"
    (group, resources), *_ = gpu_groups(doc)
    gpus = int(resources["limits"][GPU])
    for deployment in app["deployments"]:
        options = deployment["ray_actor_options"]
        most = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        assert group["maxReplicas"] * gpus >= most * options["num_gpus"]
        assert quantity(resources["limits"]["cpu"]) >= gpus / options["num_gpus"] * options["num_cpus"]
    assert doc["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")


# ---------------------------------------------------------------- the Ray cluster launcher config


def launcher_config() -> dict:
    return load((ROOT / "cluster" / "aws-gpu.yaml").read_text())


def launcher_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_config_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher_config()
    jsonschema.validate(config, launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks after filling defaults
    gpu_workers = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    _, cfg = job_config(manifest("rayjob-train.yaml")["spec"]["entrypoint"])
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_workers) >= cfg.scaling.num_workers
    assert all(t["resources"]["CPU"] >= cfg.scaling.cpus_per_worker for t in gpu_workers)


@pytest.mark.parametrize("broken", [{"max_worker": 4}, {"idle_timeout_minutes": "ten"}, {"docker": {"imag": "x"}}])
def test_broken_launcher_config_is_rejected(broken):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**launcher_config(), **broken}, launcher_schema())


def test_runtime_env_ships_the_code_and_nothing_heavy(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert {".git", ".venv", "outputs", ".device", "test-artifacts", "__pycache__"} <= set(env["excludes"])
    package = tmp_path / "pkg.zip"
    create_package(str(ROOT), package, include_gitignore=False, excludes=env["excludes"])
    import zipfile

    names = zipfile.ZipFile(package).namelist()
    assert "train/__main__.py" in names and "train/configs/tiny.yaml" in names
    assert not [n for n in names if n.split("/")[0] in {".git", ".venv", "outputs", ".device", "test-artifacts"}]
    assert package.stat().st_size < 100 * 2**20  # Ray's upload limit
