"""Static checks of infra/: the worker Dockerfile, the compose stack and the Kubernetes work-pool
job templates (no container engine or cluster needed; runs in the default suite, ~2 s).

python -m pytest tests/test_infra.py -q

- Dockerfile: parsed into instructions; CUDA and CPU bases, torch pinned to pyproject's pin, the
  project installed, every COPY source present, a non-root user, entrypoint and healthcheck.
- compose.yaml: services, healthchecks, depends_on conditions, volumes, published ports, variables.
- Kubernetes: every object (the shared-storage manifests, the Jobs rendered from the templates) is
  read into the kubernetes client's API models and written back; anything the models drop
  (an unknown or misplaced field) or convert (a wrong type) fails.
- Job templates: Prefect's own server-side template check, the variables schema, and rendering the
  way Prefect's Kubernetes worker does (prefect_kubernetes' job configuration: variable defaults +
  deployment job variables through prefect.utilities.templating.apply_values, then the worker's
  preparation for a flow run).
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SHARED_MOUNT = "/var/lib/loraflow"  # LORAFLOW_HOME in the image and on the shared volume
DOCUMENTED_PORTS = {4200, 5000}  # Prefect API + UI, MLflow (infra/README.md)
POOLS = ["gpu", "cpu"]
POOL_IDS = ["gpu-pool", "cpu-pool"]  # not "gpu": conftest skips items with a `gpu` keyword without CUDA


# --- Dockerfile ---------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comment lines go, also inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((INFRA / "Dockerfile").read_text())


def _global_args(instructions) -> dict[str, str]:
    """ARGs before the first FROM (those a FROM line may use), with their defaults."""
    args = {}
    for kw, rest in instructions:
        if kw == "FROM":
            break
        if kw == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def _stages(instructions) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> (FROM line args, then its instructions)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for kw, rest in instructions:
        if kw == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert m and m.group(2), f"every stage is named: FROM {rest}"
            current = m.group(2)
            stages[current] = [("FROM", m.group(1))]
        elif current is not None:
            stages[current].append((kw, rest))
    return stages


def _torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("torch==")]
    return pin.removeprefix("torch==")


def test_dockerfile_bases_cuda_for_gpu_and_python_for_cpu(dockerfile):
    args, stages = _global_args(dockerfile), _stages(dockerfile)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert re.match(r"python:3\.1[12]-", args["PYTHON_IMAGE"]), "the CPU base has Python 3.11 or 3.12"
    assert "ubuntu24.04" in args["CUDA_IMAGE"], "Ubuntu 24.04's python3 is 3.12 (requires-python >= 3.11)"
    assert stages["base-gpu"][0] == ("FROM", "${CUDA_IMAGE}")
    assert stages["base-cpu"][0] == ("FROM", "${PYTHON_IMAGE}")
    # The final stage picks its base by FLAVOR; both values name a stage.
    assert list(stages)[-1] == "worker" and stages["worker"][0] == ("FROM", "base-${FLAVOR}")
    assert args["FLAVOR"] == "gpu"
    for flavor in ("gpu", "cpu"):
        assert f"base-{flavor}" in stages
        index = dict(stages[f"base-{flavor}"]).get("ENV", "")
        expected = "download.pytorch.org/whl/cu" if flavor == "gpu" else "download.pytorch.org/whl/cpu"
        assert f"TORCH_INDEX_URL=https://{expected}" in index


def test_dockerfile_pins_torch_and_installs_the_project(dockerfile):
    args, worker = _global_args(dockerfile), _stages(dockerfile)["worker"]
    assert args["TORCH_VERSION"] == _torch_pin(), "the image's torch is the version pyproject.toml pins"
    runs = [rest for kw, rest in worker if kw == "RUN"]
    assert any('--index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"' in r for r in runs)
    assert any(re.search(r"pip install \"\.\[[\w,]*k8s[\w,]*\]\"", r) for r in runs), "deps + the k8s extra"
    assert any("pip install --no-deps -e ." in r for r in runs), "the project itself, editable at /opt/loraflow"
    copied = {rest.split()[0].rstrip("/") for kw, rest in worker if kw == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    wanted = {p.rstrip("*") for p in packages["include"]} | {"pyproject.toml", "configs", "data_contracts"}
    assert wanted <= copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build context is its root)"


def test_dockerfile_runs_as_non_root_with_entrypoint_and_healthcheck(dockerfile):
    worker = _stages(dockerfile)["worker"]
    users = [rest for kw, rest in worker if kw == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1] == "10001:10001"
    assert any(kw == "RUN" and "useradd --uid 10001" in rest for kw, rest in worker)
    kws = [kw for kw, _ in worker]
    assert "ENTRYPOINT" in kws and "HEALTHCHECK" in kws and "CMD" in kws
    assert json.loads(dict(worker)["ENTRYPOINT"]) == ["tini", "--"]
    assert f"LORAFLOW_HOME={SHARED_MOUNT}" in " ".join(rest for kw, rest in worker if kw == "ENV")
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".loraflow", ".git"} <= set(ignored)


def test_dockerfile_parser_joins_continuations():
    text = "FROM a AS b\n# note\nRUN one \\\n    two \\\n # inner comment\n    three\nUSER 1\n"
    assert dockerfile_instructions(text) == [("FROM", "a AS b"), ("RUN", "one two three"), ("USER", "1")]


# --- compose.yaml -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_services_and_healthchecks(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"} == set(services)
    for name, svc in services.items():
        if svc.get("restart") == "no":  # one-shot jobs
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: a healthcheck"
        assert svc.get("restart") == "unless-stopped", name
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["workers"]


def test_compose_dependencies_wait_for_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which it lacks"
            else:
                assert condition == "service_completed_successfully" and services[dep].get("restart") == "no"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_volumes_ports_and_variables(compose):
    services, declared = compose["services"], set(compose["volumes"])
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
                used.add(source)
        for port in svc.get("ports", []):
            host_ip, host_port, container_port = port.rsplit(":", 2)
            assert host_ip == "${LORAFLOW_BIND:-127.0.0.1}", f"{name}: published on the configurable bind address"
            assert int(host_port) == int(container_port) and int(host_port) in DOCUMENTED_PORTS, f"{name}: {port}"
    assert used == declared
    assert {p.rsplit(":", 2)[1] for s in services.values() for p in s.get("ports", [])} == {"4200", "5000"}
    for svc in ("worker-cpu", "worker-gpu"):
        assert f"loraflow-shared:{SHARED_MOUNT}" in services[svc]["volumes"]
        assert services[svc]["environment"]["LORAFLOW_HOME"] == SHARED_MOUNT
    # Every variable without a default is one .env.example sets.
    text = (INFRA / "compose.yaml").read_text()
    example = {
        line.split("=")[0]
        for line in (INFRA / ".env.example").read_text().splitlines()
        if "=" in line and line[0] != "#"
    }
    for var, op in re.findall(r"\$\{(\w+)(:?[-?])?", text):
        assert op in (":-", "-") or var in example, f"${{{var}}} has no default and is not in infra/.env.example"


def test_compose_servers_use_postgres_and_s3(compose):
    services = compose["services"]
    databases = re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres-init.sql").read_text())
    prefect_url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_env = services["mlflow"]["environment"]
    assert prefect_url.startswith("postgresql+asyncpg://") and prefect_url.endswith("@postgres:5432/prefect")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert set(databases) == {"prefect", "mlflow"}
    assert "--artifacts-destination=s3://mlflow" in services["mlflow"]["command"]
    assert "local/mlflow" in services["minio-init"]["command"][0]
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert services["mlflow"]["build"]["args"]["FLAVOR"] in {"cpu", "gpu"}
    assert re.fullmatch(r"prefecthq/prefect:3\.9\.1-python3\.1[12]", services["prefect-server"]["image"])


# --- Kubernetes objects against the API models ----------------------------------------------------------


def _model_name(obj: dict) -> str:
    return "V1" + obj["kind"]


def k8s_problems(obj: dict) -> list[str]:
    """Where ``obj`` differs from itself read into the kubernetes client's model and written back."""
    from kubernetes.client import ApiClient

    class _Response:  # ApiClient.deserialize reads a REST response's .data
        data = json.dumps(obj)

    client = ApiClient()
    try:
        model = client.deserialize(_Response(), _model_name(obj))
    except (ValueError, TypeError, AttributeError) as e:
        return [f"{obj['kind']}: {e}"]
    return _diff(obj, client.sanitize_for_serialization(model), obj["kind"])


def _diff(given: Any, back: Any, path: str) -> list[str]:
    if isinstance(given, dict) and isinstance(back, dict):
        problems = [f"{path}.{k}: not a field of the API model (dropped)" for k in given.keys() - back.keys()]
        return problems + [p for k in given.keys() & back.keys() for p in _diff(given[k], back[k], f"{path}.{k}")]
    if isinstance(given, list) and isinstance(back, list) and len(given) == len(back):
        return [p for i, (g, b) in enumerate(zip(given, back, strict=True)) for p in _diff(g, b, f"{path}[{i}]")]
    # A number for a quantity (resources, sizeLimit) is valid JSON for Kubernetes; the model keeps it as text.
    quantity = re.search(r"\.(limits|requests)\.[^\[\]]+$|\.sizeLimit$", path)  # keys may hold dots
    if quantity and isinstance(given, int | float) and not isinstance(given, bool) and back == str(given):
        return []
    return [] if given == back and type(given) is type(back) else [f"{path}: {given!r} reads back as {back!r}"]


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_shared_storage_manifests_are_valid_and_read_write_many():
    docs = {d["kind"]: d for d in _yaml_docs(K8S / "shared-storage.yaml")}
    assert set(docs) == {"Namespace", "PersistentVolumeClaim", "ServiceAccount"}
    for doc in docs.values():
        assert k8s_problems(doc) == []
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["namespace"] == docs["Namespace"]["metadata"]["name"]


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"spec": {"accesModes": ["ReadWriteMany"]}}, "spec.accesModes: not a field"),
        ({"spec": {"accessModes": "ReadWriteMany"}}, "spec.accessModes"),
        ({"spec": {"resources": {"requests": {"storage": "1Gi"}, "limit": {}}}}, "spec.resources.limit: not a field"),
        ({"metadata": {"name": "x", "labels": {"a": "b"}, "namespace": 3}}, "metadata.namespace"),
    ],
)
def test_k8s_check_catches_bad_fields(bad, problem):
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"}, "spec": {}}
    pvc.update(bad)
    assert any(p.startswith(f"PersistentVolumeClaim.{problem}") for p in k8s_problems(pvc)), k8s_problems(pvc)


def test_k8s_check_catches_a_misplaced_pod_field():
    """Prefect's stock template puts `parallelism` in the pod spec, where Kubernetes ignores it."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "x"},
        "spec": {"template": {"spec": {"parallelism": 1, "containers": [{"name": "c", "image": "i"}]}}},
    }
    assert k8s_problems(job) == ["Job.spec.template.spec.parallelism: not a field of the API model (dropped)"]


# --- Work-pool job templates, rendered as Prefect's Kubernetes worker renders them ----------------------


def _template(pool: str) -> dict:
    return json.loads((K8S / f"{pool}-pool-job-template.json").read_text())


class _NoApi:
    """Stands in for a Prefect client: rendering these templates must not need the API."""

    def __getattr__(self, name):
        raise AssertionError(f"rendering called the Prefect API ({name})")


def render_job(template: dict, job_variables: dict) -> dict:
    """The Job manifest the Kubernetes worker would submit for a flow run of a deployment with these
    job variables: defaults + job variables applied to job_configuration, then prepared for a run."""
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=_NoApi())
    )
    flow = Flow(id=uuid.uuid4(), name="train")
    config.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=flow.id, name="brisk-otter"), flow=flow)
    return config.job_manifest


@pytest.mark.parametrize("pool", POOLS, ids=POOL_IDS)
def test_template_passes_prefects_own_checks(pool):
    from prefect._internal.schemas.validators import validate_values_conform_to_schema
    from prefect.server.schemas.actions import validate_base_job_template

    template = _template(pool)
    validate_base_job_template(template)  # what the server runs on `prefect work-pool create`
    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    validate_values_conform_to_schema(defaults, template["variables"])
    with pytest.raises(ValueError, match="image_pull_policy"):
        validate_values_conform_to_schema({"image_pull_policy": "Sometimes"}, template["variables"])


@pytest.mark.parametrize("pool", POOLS, ids=POOL_IDS)
def test_rendered_job_is_a_valid_job_with_the_shared_volume(pool):
    template = _template(pool)
    job = render_job(template, {"image": f"registry.example.com/loraflow-worker:{pool}", "env": {"EXTRA": "1"}})
    assert k8s_problems(job) == []
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"registry.example.com/loraflow-worker:{pool}"
    env = {e["name"]: e["value"] for e in container["env"]}
    # The deployment's env is merged over the pool's defaults; Prefect adds the flow run's.
    assert env["EXTRA"] == "1" and env["LORAFLOW_HOME"] == SHARED_MOUNT and "PREFECT__FLOW_RUN_ID" in env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["loraflow-shared"] == SHARED_MOUNT
    assert volumes["loraflow-shared"]["persistentVolumeClaim"]["claimName"] == "loraflow-shared"
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]
    assert job["metadata"]["namespace"] == "loraflow" and job["metadata"]["generateName"].startswith("brisk-otter-")
    assert job["spec"]["backoffLimit"] == 0
    # The image's user (infra/Dockerfile) owns the files on the shared volume.
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 10001
    assert pod["serviceAccountName"] == "loraflow-runner"


def test_template_names_match_the_shared_storage_manifests():
    docs = {d["kind"]: d for d in _yaml_docs(K8S / "shared-storage.yaml")}
    for pool in ("gpu", "cpu"):
        props = _template(pool)["variables"]["properties"]
        assert props["shared_claim"]["default"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
        assert props["namespace"]["default"] == docs["Namespace"]["metadata"]["name"]
        assert props["service_account_name"]["default"] == docs["ServiceAccount"]["metadata"]["name"]


def test_gpu_job_requests_gpus_on_gpu_nodes():
    job = render_job(_template("gpu"), {})
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]

    two = render_job(_template("gpu"), {"gpu_count": 2, "node_selector": {"gpu": "h200"}})
    assert two["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert two["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h200"}
    assert k8s_problems(two) == []


@pytest.mark.parametrize("n", [2, 4, 8])
def test_gpu_job_asks_for_n_gpus_on_one_node(n):
    """train.distributed='ddp' with train.gpus unset starts one rank per GPU the pod sees (flows/trainer.py):
    a deployment's gpu_count N must give one pod, on one node, holding N GPUs, all visible, with /dev/shm."""
    job = render_job(_template("gpu"), {"gpu_count": n, "shm_size": "32Gi"})
    assert k8s_problems(job) == []
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1  # one pod: one node
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == n
    env = {e["name"] for e in container["env"]}
    assert "CUDA_VISIBLE_DEVICES" not in env and "NVIDIA_VISIBLE_DEVICES" not in env  # the device plugin's choice
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}  # NCCL's shared-memory transport
    readme = (INFRA / "README.md").read_text()
    assert "gpu_count" in readme and "train.distributed=ddp" in readme


def test_gpu_count_is_bounded_by_the_schema():
    from prefect._internal.schemas.validators import validate_values_conform_to_schema

    with pytest.raises(ValueError, match="gpu_count"):
        validate_values_conform_to_schema({"gpu_count": 0}, _template("gpu")["variables"])


def test_cpu_job_asks_for_no_gpu():
    job = render_job(_template("cpu"), {})
    assert "nvidia.com/gpu" not in json.dumps(job)
    assert "tolerations" not in job["spec"]["template"]["spec"]
