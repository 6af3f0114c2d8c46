"""The production stack in infra/, checked without a container engine.

There is no Docker engine on these machines, so ``docker compose config`` cannot run. Instead:
the compose file is validated against the Compose Specification's JSON schema (vendored in
tests/data), interpolated with the values of ``infra/.env.example`` the way Compose does, and
checked for consistency: every variable declared, every image/port/credential taken from the
env file, published ports unique and on loopback, health checks and dependencies coherent, the
workers pointed at the servers and buckets the stack actually creates. The Kubernetes GPU job
template is rendered with Prefect's own templating and must reserve ``nvidia.com/gpu: 1``. The
data path's Dask cluster (compose services, the operator's ``DaskCluster``) is checked against
what ``hap.core.engine`` reads: one scheduler address, the flow's workers pointed at it, the Dask
workers on the same image, volume and memory limit as the local engine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from hap.core.config import load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
SCHEMA = REPO / "tests" / "fixtures" / "compose-spec.json"
GPU_TEMPLATE = INFRA / "k8s" / "gpu-pool-base-job-template.json"
DASK_CLUSTER = INFRA / "k8s" / "dask-cluster.yaml"

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR; "$$" is a literal "$".
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
SERVER_PORTS = {
    "postgres": 5432,
    "mlflow": 5000,
    "prefect-server": 4200,
    "evidently-ui": 8000,
    "dask-scheduler": 8786,
}
DASK_SCHEDULER = f"tcp://dask-scheduler:{SERVER_PORTS['dask-scheduler']}"
# The Dask operator's names: the Service it creates, its port names, its pod labels.
DASK_SCHEDULER_SERVICE = "{cluster}-scheduler"
DASK_PORT_NAMES = {"tcp-comm": 8786, "http-dashboard": 8787}
# What the operator's CRD requires of a DaskCluster (customresources/templates.yaml in
# dask-kubernetes): scheduler.spec + scheduler.service, worker.spec, an integer replicas. Unknown
# keys are refused here: the served CRD would prune a misspelt field without a word.
DASK_CLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubernetes.dask.org/v1"},
        "kind": {"const": "DaskCluster"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scheduler", "worker"],
            "additionalProperties": False,
            "properties": {
                "idleTimeout": {"type": "integer", "minimum": 0},
                "scheduler": {
                    "type": "object",
                    "required": ["spec", "service"],
                    "additionalProperties": False,
                    "properties": {
                        "metadata": {"type": "object"},
                        "spec": {"$ref": "#/definitions/podSpec"},
                        "service": {
                            "type": "object",
                            "required": ["selector", "ports"],
                            "properties": {"ports": {"type": "array", "minItems": 1}},
                        },
                    },
                },
                "worker": {
                    "type": "object",
                    "required": ["spec"],
                    "additionalProperties": False,
                    "properties": {
                        "metadata": {"type": "object"},
                        "replicas": {"type": "integer", "minimum": 1},
                        "spec": {"$ref": "#/definitions/podSpec"},
                    },
                },
            },
        },
    },
    "definitions": {
        "podSpec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name", "image", "args", "resources"]},
                }
            },
        }
    },
}


def compose_bytes(value: str) -> int:
    """A Compose memory size ('4g', '512m'): binary units, as Docker reads them."""
    m = re.fullmatch(r"(\d+)([bkmg]?)b?", str(value).lower())
    assert m, f"'{value}' is not a Compose byte value"
    return int(m.group(1)) * 1024 ** "bkmg".index(m.group(2) or "b")


def k8s_bytes(value: str) -> int:
    """A Kubernetes memory quantity in binary units ('4Gi', '512Mi')."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(value))
    assert m, f"'{value}' is not a binary Kubernetes quantity"
    return int(m.group(1)) * 1024 ** (["", "Ki", "Mi", "Gi", "Ti"].index(m.group(2) or ""))


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line."""
    assert name in args, f"{name} missing from {args}"
    return str(args[args.index(name) + 1])


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as Compose's --env-file reads them (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: '{line}' is not KEY=VALUE"
        out[key.strip()] = value.strip()
    return out


def referenced_vars(text: str) -> set[str]:
    text = text.replace("$$", "")
    return {m.group(1) or m.group(4) for m in _VAR.finditer(text)}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation, enough of it for this file; unset required vars fail."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            return value if value not in (None, "") or (op == "-" and value is not None) else arg
        if op in (":?", "?"):
            if value in (None, "") if op == ":?" else value is None:
                raise KeyError(f"required variable {name} unset: {arg}")
            return value
        if value is None:
            raise KeyError(f"variable {name} unset and without default")
        return value

    sentinel = "\x00DOLLAR\x00"
    return _VAR.sub(sub, text.replace("$$", sentinel)).replace(sentinel, "$")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw_text() -> str:
    """The compose file without its comment lines (Compose does not interpolate comments)."""
    return "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))


@pytest.fixture(scope="module")
def compose(raw_text: str, env: dict[str, str]) -> dict[str, Any]:
    """The compose model as `docker compose --env-file infra/.env.example config` would see it."""
    return yaml.safe_load(interpolate(raw_text, env))


def _validator():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_is_valid_against_the_compose_spec(raw_text: str, compose: dict[str, Any]) -> None:
    validator = _validator()
    assert _errors(validator, yaml.safe_load(raw_text)) == []
    assert _errors(validator, compose) == []


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """Guard against a validator that accepts anything: typos must be rejected."""
    validator = _validator()
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    broken["services"]["postgres"]["ports"] = "5432:5432"
    errors = _errors(validator, broken)
    assert any("helthcheck" in e for e in errors) and any(
        e.startswith("services/postgres/ports") for e in errors
    )


def test_every_variable_is_declared_in_env_example_and_every_setting_is_used(
    raw_text: str, env: dict[str, str]
) -> None:
    used = referenced_vars(raw_text)
    assert used - env.keys() == set(), "compose uses variables missing from .env.example"
    assert env.keys() - used == set(), ".env.example declares settings the compose file never uses"


def test_no_secret_is_in_the_repository(raw_text: str, env: dict[str, str]) -> None:
    for key, value in env.items():
        if _SECRET_KEY.search(key):
            assert value.startswith("change-me"), f".env.example {key} must be a placeholder"
    model = yaml.safe_load(raw_text)
    for name, svc in model["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if _SECRET_KEY.search(key):
                assert "${" in str(value), f"{name}.{key} is hard-coded; take it from .env"
    ignored = (INFRA / ".gitignore").read_text().split()
    assert ".env" in ignored


def test_every_service_image_comes_from_env_example(compose: dict[str, Any], raw_text: str) -> None:
    raw = yaml.safe_load(raw_text)["services"]
    for name, svc in raw.items():
        assert re.fullmatch(r"\$\{[A-Z_]+_IMAGE:\?[^}]+\}", svc.get("image", "")), (
            f"{name}: image must be a required ${{..._IMAGE}} variable"
        )
        assert ":" in compose["services"][name]["image"], f"{name}: image tag not pinned"


def test_ports_are_explicit_unique_and_on_loopback(compose: dict[str, Any], env: dict[str, str]) -> None:
    seen: dict[int, str] = {}
    for name, svc in compose["services"].items():
        for spec in svc.get("ports", []):
            host_ip, host_port, container_port = str(spec).split(":")
            assert host_ip == env["HAP_BIND_ADDRESS"] == "127.0.0.1", f"{name} publishes beyond loopback"
            assert host_port.isdigit() and container_port.isdigit(), f"{name}: '{spec}' not explicit"
            assert int(host_port) not in seen, f"{name} and {seen.get(int(host_port))} share {host_port}"
            seen[int(host_port)] = name
    published = {
        name: int(str(svc["ports"][0]).split(":")[2])
        for name, svc in compose["services"].items()
        if svc.get("ports")
    }
    for server, port in SERVER_PORTS.items():
        assert published.get(server) == port, f"{server} must publish its port {port}"
    assert {int(env[k]) for k in env if k.endswith("_PORT")} == set(seen)


def test_health_checks_dependencies_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    one_shot = {n for n, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"minio-init"}
    for name, svc in services.items():
        if name not in one_shot:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep]
            if cond["condition"] == "service_completed_successfully":
                assert dep in one_shot
        for mount in svc.get("volumes", []):
            source = str(mount).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
            else:
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing {source}"
    assert {"pg-data", "minio-data", "hap-data"} <= set(compose["volumes"])


def test_servers_use_postgres_and_s3(compose: dict[str, Any], env: dict[str, str]) -> None:
    s = compose["services"]
    mlflow_env = s["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith(f"@postgres:5432/{env['MLFLOW_DB']}")
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{env['MLFLOW_ARTIFACT_BUCKET']}/"
    assert "MLFLOW_ARTIFACTS_DESTINATION" in " ".join(s["mlflow"]["command"])
    prefect_db = s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith(f"/{env['PREFECT_DB']}")
    init = s["postgres"]["environment"]
    assert (init["MLFLOW_DB"], init["PREFECT_DB"]) == (env["MLFLOW_DB"], env["PREFECT_DB"])
    script = (INFRA / "postgres" / "init-databases.sh").read_text()
    assert "$MLFLOW_DB" in script and "$PREFECT_DB" in script


def test_workers_get_the_settings_the_code_reads(compose: dict[str, Any], env: dict[str, str]) -> None:
    s = compose["services"]
    buckets = " ".join(s["minio-init"]["command"])
    for name in ("worker-cpu", "worker-gpu"):
        e = s[name]["environment"]
        assert e["PREFECT_API_URL"] == f"http://prefect-server:{SERVER_PORTS['prefect-server']}/api"
        assert e["MLFLOW_TRACKING_URI"] == f"http://mlflow:{SERVER_PORTS['mlflow']}"
        assert e["HAP_DVC_REMOTE"].startswith(f"s3://{env['DVC_BUCKET']}/")
        assert (
            load_config(environ={"HAP_DVC_REMOTE": e["HAP_DVC_REMOTE"]}).dvc_remote_url()
            == e["HAP_DVC_REMOTE"]
        )
        assert e["AWS_ENDPOINT_URL"] == e["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert {"hap-data:/data"} == set(s[name]["volumes"]) and e["HAP_HOME"] == "/data"
        # the hap config accepts the override the stack sets
        key = "HAP__ORCHESTRATION__TRAIN_ON"
        assert load_config(environ={key: e[key]}).orchestration.train_on == env["TRAIN_ON"]
    for bucket in ("MLFLOW_ARTIFACT_BUCKET", "DVC_BUCKET"):
        assert (
            f"$${bucket}" in yaml.safe_load(COMPOSE.read_text())["services"]["minio-init"]["command"][0]
            or f"${{{bucket}}}" in buckets
        )
    assert (
        s["worker-cpu"]["command"][s["worker-cpu"]["command"].index("--pool") + 1] == env["PREFECT_CPU_POOL"]
    )
    assert (
        s["worker-gpu"]["command"][s["worker-gpu"]["command"].index("--pool") + 1] == env["PREFECT_GPU_POOL"]
    )


def test_gpu_worker_reserves_an_nvidia_device(compose: dict[str, Any], env: dict[str, str]) -> None:
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": int(env["GPU_COUNT"]), "capabilities": ["gpu"]}]
    assert gpu["build"]["dockerfile"] == "infra/Dockerfile.cuda"
    assert gpu["profiles"] == ["gpu"], "the GPU worker must not start on machines without a GPU"
    assert "deploy" not in compose["services"]["worker-cpu"]


def test_dockerfiles_install_the_pinned_project(env: dict[str, str]) -> None:
    for name, index in (("Dockerfile", "/whl/cpu"), ("Dockerfile.cuda", "/whl/cu")):
        text = (INFRA / name).read_text()
        assert text.splitlines()[0].startswith("# syntax=")
        assert re.search(r"^FROM python:3\.11-slim", text, re.M)
        assert "-c constraints.txt" in text and index in text
        assert re.search(r"^USER hap$", text, re.M), f"{name} must not run as root"
        for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
            *sources, _dest = line.split()
            for src in sources:
                assert src == "." or (REPO / src).exists(), f"{name}: COPY source {src} missing"
        assert (INFRA / f"{name}.dockerignore").exists()
    assert "NVIDIA_VISIBLE_DEVICES" in (INFRA / "Dockerfile.cuda").read_text()


def test_gpu_job_template_renders_with_one_gpu() -> None:
    """Prefect's own templating fills the template; the Job asks for exactly one NVIDIA GPU."""
    import jsonschema
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(GPU_TEMPLATE.read_text())
    variables = template["variables"]
    declared = set(variables["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used == declared, f"undeclared {used - declared}, unused {declared - used}"
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)

    job = apply_values(template["job_configuration"], {**defaults, "name": "train-2026-11-05"})
    manifest = job["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["metadata"]["generateName"] == "train-2026-11-05-"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["image"] == "hap-prerank-cuda:latest"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["restartPolicy"] == "Never" and manifest["spec"]["backoffLimit"] == 0
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data", "/dev/shm"}
    assert job["env"]["HAP__TRAIN__DEVICE"] == "cuda"


def test_prefect_deployments_use_the_pools_the_workers_serve(env: dict[str, str]) -> None:
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert deployments["daily-retrain"]["work_pool"]["name"] == env["PREFECT_CPU_POOL"]
    assert deployments["backfill"]["work_pool"]["name"] == env["PREFECT_CPU_POOL"]
    assert deployments["train-ghcl"]["work_pool"]["name"] == env["PREFECT_GPU_POOL"]


def test_helm_values_point_workers_at_the_pools_and_the_server(env: dict[str, str]) -> None:
    config = yaml.safe_load((INFRA / "k8s" / "hap-config.yaml").read_text())["data"]
    for kind, pool in (("gpu", env["PREFECT_GPU_POOL"]), ("cpu", env["PREFECT_CPU_POOL"])):
        values = yaml.safe_load((INFRA / "k8s" / f"prefect-worker-{kind}-values.yaml").read_text())
        worker = values["worker"]
        assert worker["config"]["workPool"] == pool and worker["config"]["type"] == "kubernetes"
        assert worker["apiConfig"] == "selfHostedServer"
        assert worker["selfHostedServerApiConfig"]["apiUrl"] == config["PREFECT_API_URL"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "HAP_HOME", "HAP_DVC_REMOTE"):
        assert config[key], key
    assert not any(_SECRET_KEY.search(k) for k in config), "credentials belong in the Secret"


# ---- the data path's Dask cluster ---------------------------------------------------------------
def _daily_flow_services(compose: dict[str, Any]) -> list[str]:
    """The services whose Prefect worker serves the pool the daily and backfill flows run on."""
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    pools = {deployments[name]["work_pool"]["name"] for name in ("daily-retrain", "backfill")}
    return [
        name
        for name, svc in compose["services"].items()
        if "--pool" in (svc.get("command") or []) and flag(svc["command"], "--pool") in pools
    ]


def test_dask_scheduler_and_workers_run_the_hap_image(compose: dict[str, Any], env: dict[str, str]) -> None:
    from hap.core import engine

    s = compose["services"]
    scheduler, worker, cpu = s["dask-scheduler"], s["dask-worker"], s["worker-cpu"]
    for svc in (scheduler, worker):
        assert (svc["image"], svc["build"]) == (cpu["image"], cpu["build"]), "one image for flows and Dask"
        assert "profiles" not in svc, "the cluster starts with the stack"
    cmd = scheduler["command"]
    assert cmd[:2] == ["dask", "scheduler"] and flag(cmd, "--host") == "0.0.0.0"
    assert int(flag(cmd, "--port")) == SERVER_PORTS["dask-scheduler"]
    dashboard = int(flag(cmd, "--dashboard-address").rpartition(":")[2])
    assert [str(p).split(":")[1:] for p in scheduler["ports"]] == [
        [env["DASK_SCHEDULER_PORT"], "8786"],
        [env["DASK_DASHBOARD_PORT"], str(dashboard)],
    ]
    assert f"127.0.0.1:{dashboard}/health" in " ".join(scheduler["healthcheck"]["test"])

    # the workers join the scheduler by its address on the compose network, once it is healthy
    cmd = worker["command"]
    assert cmd[:3] == ["dask", "worker", DASK_SCHEDULER] and flag(cmd, "--nthreads") == "1"
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    worker_http = int(flag(cmd, "--dashboard-address").rpartition(":")[2])
    assert f"127.0.0.1:{worker_http}/health" in " ".join(worker["healthcheck"]["test"])
    assert worker["deploy"]["replicas"] == int(env["DASK_WORKERS"]) >= 1
    assert "ports" not in worker, "replicas cannot share a host port"

    # the per-bucket work reads and writes the data root: the CPU worker's volume and settings
    assert worker["volumes"] == cpu["volumes"] == ["hap-data:/data"]
    assert worker["environment"]["HAP_HOME"] == "/data"
    assert "HAP_DASK_ADDRESS" not in worker["environment"], "code on a Dask worker runs in-process"
    assert worker["environment"] == {k: v for k, v in cpu["environment"].items() if k != "HAP_DASK_ADDRESS"}
    assert engine.scheduler_address(load_config(environ=dict(worker["environment"]))) is None


def test_dask_worker_memory_limit_matches_the_container_and_the_engine(compose: dict[str, Any]) -> None:
    from dask.utils import parse_bytes

    worker = compose["services"]["dask-worker"]
    dask_limit = parse_bytes(flag(worker["command"], "--memory-limit"))
    assert dask_limit == compose_bytes(worker["deploy"]["resources"]["limits"]["memory"])
    # a bucket is sized (engine.bucket_requests) for the local workers' limit: the same here
    assert dask_limit == parse_bytes(load_config().engine.worker_memory)
    assert _preloads(worker["command"]) == load_config().engine.worker_preload


def _preloads(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--preload"]


def test_the_daily_flow_runs_its_data_steps_on_the_cluster(compose: dict[str, Any]) -> None:
    from hap.core import engine

    s = compose["services"]
    flow_services = _daily_flow_services(compose)
    assert flow_services == ["worker-cpu"]
    for name in flow_services:
        address = s[name]["environment"]["HAP_DASK_ADDRESS"]
        assert address == DASK_SCHEDULER
        assert s[name]["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
        cfg = load_config(environ={"HAP_DASK_ADDRESS": address})
        assert cfg.engine.address == engine.scheduler_address(cfg) == address


@pytest.fixture(scope="module")
def dask_cluster() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(DASK_CLUSTER.read_text()) if d]
    assert len(docs) == 1, "dask-cluster.yaml holds the DaskCluster only"
    return docs[0]


def _containers(cluster: dict[str, Any], role: str) -> dict[str, Any]:
    (container,) = cluster["spec"][role]["spec"]["containers"]
    return container


def test_dask_cluster_manifest_follows_the_operator_crd(dask_cluster: dict[str, Any]) -> None:
    import jsonschema

    validator = jsonschema.Draft7Validator(DASK_CLUSTER_SCHEMA)
    assert _errors(validator, dask_cluster) == []
    broken = json.loads(json.dumps(dask_cluster))
    broken["spec"]["workers"] = broken["spec"].pop("worker")
    assert any("workers" in e for e in _errors(validator, broken)), "the schema must catch typos"

    name, spec = dask_cluster["metadata"]["name"], dask_cluster["spec"]
    config = yaml.safe_load((INFRA / "k8s" / "hap-config.yaml").read_text())
    assert dask_cluster["metadata"]["namespace"] == config["metadata"]["namespace"]
    # the scheduler listens where its Service sends traffic, on the port names the operator uses
    scheduler = _containers(dask_cluster, "scheduler")
    args = scheduler["args"]
    assert args[:2] == ["dask", "scheduler"] and int(flag(args, "--port")) == SERVER_PORTS["dask-scheduler"]
    assert int(flag(args, "--dashboard-address").rpartition(":")[2]) == DASK_PORT_NAMES["http-dashboard"]
    assert {p["name"]: p["containerPort"] for p in scheduler["ports"]} == DASK_PORT_NAMES
    service = spec["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["ports"]} == {
        n: (port, n) for n, port in DASK_PORT_NAMES.items()
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert scheduler[probe]["httpGet"] == {"port": "http-dashboard", "path": "/health"}
    assert scheduler["resources"]["limits"]["memory"]


def test_dask_cluster_workers_match_the_flow_runs(dask_cluster: dict[str, Any], env: dict[str, str]) -> None:
    from dask.utils import parse_bytes

    from hap.core import engine

    spec = dask_cluster["spec"]
    scheduler, worker = _containers(dask_cluster, "scheduler"), _containers(dask_cluster, "worker")
    assert scheduler["image"] == worker["image"] == env["HAP_IMAGE"], "the CPU hap image on both ends"
    assert spec["worker"]["replicas"] >= 1
    args = worker["args"]
    # the operator fills in DASK_SCHEDULER_ADDRESS (its Service) and DASK_WORKER_NAME
    assert args[:3] == ["dask", "worker", "$(DASK_SCHEDULER_ADDRESS)"]
    assert flag(args, "--name") == "$(DASK_WORKER_NAME)" and flag(args, "--nthreads") == "1"
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert (
        parse_bytes(flag(args, "--memory-limit"))
        == k8s_bytes(limits["memory"])
        == k8s_bytes(requests["memory"])
    )
    assert k8s_bytes(limits["memory"]) == parse_bytes(load_config().engine.worker_memory)
    assert _preloads(args) == load_config().engine.worker_preload

    # the data root and the settings as the flow-run Jobs see them (the GPU job template's defaults)
    job = json.loads(GPU_TEMPLATE.read_text())["variables"]["properties"]
    pod = spec["worker"]["spec"]
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == {
        "hap-data": job["data_pvc"]["default"]
    }
    assert worker["volumeMounts"] == [{"name": "hap-data", "mountPath": "/data"}]
    assert [next(iter(ref.values()))["name"] for ref in worker["envFrom"]] == [
        job["config_map_name"]["default"],
        job["secret_name"]["default"],
    ]
    own = {e["name"]: e["value"] for e in worker["env"]}
    assert own["HAP_HOME"] == "/data"
    # hap-config's HAP_DASK_ADDRESS is blanked on the workers: an empty value is no address
    assert own["HAP_DASK_ADDRESS"] == ""
    config = yaml.safe_load((INFRA / "k8s" / "hap-config.yaml").read_text())["data"]
    assert engine.scheduler_address(load_config(environ={**config, **own})) is None


def test_flow_runs_on_kubernetes_get_the_cluster_address(dask_cluster: dict[str, Any]) -> None:
    from hap.core import engine

    config = yaml.safe_load((INFRA / "k8s" / "hap-config.yaml").read_text())
    name, namespace = dask_cluster["metadata"]["name"], dask_cluster["metadata"]["namespace"]
    service = DASK_SCHEDULER_SERVICE.format(cluster=name)
    address = config["data"]["HAP_DASK_ADDRESS"]
    assert address == f"tcp://{service}.{namespace}.svc.cluster.local:{DASK_PORT_NAMES['tcp-comm']}"
    assert engine.scheduler_address(load_config(environ={"HAP_DASK_ADDRESS": address})) == address
    assert f"tcp://{service}.{namespace}.svc.cluster.local:8786" in DASK_CLUSTER.read_text()
