"""The production stack in infra/, checked without a container engine.

There is no Docker engine on these machines, so ``docker compose config`` cannot run. Instead:
the compose file is validated against the Compose Specification's JSON schema (vendored in
tests/data), interpolated with the values of ``infra/.env.example`` the way Compose does, and
checked for consistency: every variable declared, every image/port/credential taken from the
env file, published ports unique and on loopback, health checks and dependencies coherent, the
workers pointed at the servers and buckets the stack actually creates. The Kubernetes GPU job
template is rendered with Prefect's own templating and must reserve ``nvidia.com/gpu: 1``.
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

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR; "$$" is a literal "$".
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
SERVER_PORTS = {"postgres": 5432, "mlflow": 5000, "prefect-server": 4200, "evidently-ui": 8000}


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
    jsonschema = pytest.importorskip("jsonschema")
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
    jsonschema = pytest.importorskip("jsonschema")
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
