"""deploy/kubernetes: schema validation offline, kustomize structure, and the sidecar's contract.

Objects are validated with kubernetes-validate's bundled schemas (strict:
unknown fields are errors) for the oldest supported and the newest known
Kubernetes; the Prometheus Operator's CRDs with our own minimal schemas.
The rest checks what no schema can: that the pieces agree with each other
and with tidegate's own configuration loader.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from proxy.config import load_config

from .conftest import (
    BASE,
    CUSTOM_KINDS,
    KUBERNETES,
    KUBERNETES_VERSIONS,
    OVERLAY,
    ROOT,
    SCHEMAS,
    find,
    kustomization_dirs,
    kustomize,
    load_documents,
    manifest_files,
)

LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+$")


def _version(version: str) -> str:
    return kubernetes_validate.latest_version() if version == "latest" else version


def validate(obj: dict[str, Any], version: str) -> None:
    custom = CUSTOM_KINDS.get((obj.get("apiVersion"), obj.get("kind")))
    if custom is not None:
        schema = json.loads((SCHEMAS / custom).read_text())
        jsonschema.validate(obj, schema)
        return
    try:
        kubernetes_validate.validate(obj, _version(version), strict=True)
    except kubernetes_validate.ValidationError as error:
        # The library's message embeds the whole schema; the path and the reason suffice.
        path = "/".join(str(p) for p in error.path)
        pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')}: {path}: {error.message}")


# ---------------------------------------------------------------- schemas

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_files_validate(path: Path, version: str) -> None:
    for obj in load_documents(path):
        validate(obj, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomize_output_validates(directory: Path, version: str) -> None:
    objects = kustomize(directory)
    assert objects
    for obj in objects:
        validate(obj, version)


def test_schemas_are_offline_and_strict() -> None:
    """kubernetes-validate must reject an unknown field (strict) without any download."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, _version("1.30.0"), strict=True)


def test_custom_schemas_reject_mistakes() -> None:
    monitor = find(load_documents(BASE / "servicemonitor.yaml"), "ServiceMonitor")
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, "latest")


# ---------------------------------------------------------------- kustomize structure

@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_references_exist(directory: Path) -> None:
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization.get("resources", []):
        target = directory / resource
        assert target.exists(), f"{directory.name}: resource {resource} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{resource} has no kustomization.yaml"
        else:
            # kustomize refuses files outside the kustomization's own tree
            assert target.resolve().is_relative_to(directory.resolve()), resource
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        for entry in generator.get("files", []) + generator.get("envs", []):
            name = entry.split("=", 1)[-1]
            assert (directory / name).is_file(), f"{generator['name']}: {name} does not exist"


def test_overlay_builds_on_the_base_and_sets_what_users_change() -> None:
    overlays = sorted(p.parent for p in (KUBERNETES / "overlays").rglob("kustomization.yaml"))
    assert overlays == [OVERLAY]
    files = sorted(p.name for p in OVERLAY.iterdir())
    assert files == ["kustomization.yaml"], "the example overlay is the one file users edit"
    kustomization = load_documents(OVERLAY / "kustomization.yaml")[0]
    assert [(OVERLAY / r).resolve() for r in kustomization["resources"]] == [BASE.resolve()]
    assert {image["name"] for image in kustomization["images"]} == {"tidegate", "shop-app"}
    (secret,) = kustomization["secretGenerator"]
    assert secret["behavior"] == "replace"
    keys = {literal.split("=", 1)[0] for literal in secret["literals"]}
    base = load_documents(BASE / "kustomization.yaml")[0]
    (base_secret,) = base["secretGenerator"]
    assert keys == {literal.split("=", 1)[0] for literal in base_secret["literals"]}


def test_rendered_images_are_pinned() -> None:
    deployment = find(kustomize(OVERLAY), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    for container in spec["initContainers"] + spec["containers"]:
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and tag and tag != "latest" and "/" not in tag), image


# ---------------------------------------------------------------- the sidecar

@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    """The base's objects, straight from its files."""
    found = []
    for path in manifest_files():
        if path.parent == BASE:
            found.extend(load_documents(path))
    return found


@pytest.fixture(scope="module")
def pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment")["spec"]["template"]


@pytest.fixture(scope="module")
def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "tidegate"]
    return container


@pytest.fixture(scope="module")
def app(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def toml_config() -> dict[str, Any]:
    return tomllib.loads((BASE / "tidegate.toml").read_text())


def secret_literals(directory: Path) -> dict[str, str]:
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    (secret,) = kustomization["secretGenerator"]
    return dict(literal.split("=", 1) for literal in secret["literals"])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def test_tidegate_is_a_native_sidecar(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    assert sidecar["restartPolicy"] == "Always"
    assert pod["spec"]["initContainers"][0]["name"] == "tidegate", "starts before anything else"
    assert sidecar["image"] == "tidegate"
    assert sidecar["args"] == ["--config", "/etc/tidegate/tidegate.toml"]


def test_probes_use_the_health_endpoints(sidecar: dict[str, Any], toml_config: dict[str, Any]) -> None:
    port = int(toml_config["http_listen"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"metrics": port}, "only the HTTP port is reachable from outside the pod"
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = sidecar[probe]["httpGet"]
        assert (get["path"], ports.get(get["port"], get["port"])) == (path, port), probe
    # /readyz gives up after 5 s on its own; the probe must wait for that answer.
    assert sidecar["readinessProbe"]["timeoutSeconds"] > 5


def test_configuration_is_valid_for_tidegate(sidecar: dict[str, Any], tmp_path: Path) -> None:
    """The ConfigMap's file plus the Secret's variables pass tidegate's own validation."""
    literals = secret_literals(OVERLAY)
    environment = {}
    for name, entry in env_of(sidecar).items():
        reference = entry["valueFrom"]["secretKeyRef"]
        assert reference["name"] == "shop-db"
        environment[name] = literals[reference["key"]]
    config = load_config(["--config", str(BASE / "tidegate.toml")], environment)
    assert config.listen == ("127.0.0.1", 6033), "the MySQL port must only be reachable inside the pod"
    assert config.admin.listen[0] == "127.0.0.1" and not config.admin.allow_remote
    assert config.http_listen == ("0.0.0.0", 9104)
    assert [b.role for b in config.backends] == ["primary", "replica"]
    assert config.admin.password


def test_admin_and_mysql_ports_stay_on_loopback(toml_config: dict[str, Any], sidecar: dict[str, Any]) -> None:
    assert LOOPBACK.match(toml_config["listen"])
    assert LOOPBACK.match(toml_config["admin"]["listen"])
    # nothing in the environment overrides the file's listeners
    assert not {"TIDEGATE_LISTEN", "TIDEGATE_ADMIN_LISTEN", "TIDEGATE_ADMIN_ALLOW_REMOTE"} & set(env_of(sidecar))


def test_app_talks_to_the_sidecar(app: dict[str, Any], toml_config: dict[str, Any]) -> None:
    env = env_of(app)
    host, port = toml_config["listen"].rsplit(":", 1)
    assert env["DB_HOST"]["value"] == host
    assert env["DB_PORT"]["value"] == port
    assert f"@{host}:{port}/" in env["DATABASE_URL"]["value"]
    for name in ("DB_USER", "DB_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "shop-db"
    # $(VAR) references only see variables defined earlier in the list
    names = [entry["name"] for entry in app["env"]]
    for used in re.findall(r"\$\((\w+)\)", env["DATABASE_URL"]["value"]):
        assert names.index(used) < names.index("DATABASE_URL"), used


def test_secret_keys_exist(pod: dict[str, Any]) -> None:
    for directory in (BASE, OVERLAY):
        literals = secret_literals(directory)
        for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
            for entry in container.get("env", []):
                reference = entry.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    assert reference["key"] in literals, f"{directory.name}: {reference['key']}"


def test_config_map_is_mounted(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    kustomization = load_documents(BASE / "kustomization.yaml")[0]
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    mount = mounts["/etc/tidegate"]
    assert mount["readOnly"] is True
    name = volumes[mount["name"]]["configMap"]["name"]
    assert generated[name] == ["tidegate.toml"]


def test_shutdown_budget_matches_the_drain(
    pod: dict[str, Any], app: dict[str, Any], toml_config: dict[str, Any]
) -> None:
    """Grace period >= app preStop + app drain + tidegate's shutdown_grace + margin."""
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    app_drain = int(env_of(app)["SHUTDOWN_TIMEOUT"]["value"])
    shutdown_grace = float(str(toml_config["limits"]["shutdown_grace"]).rstrip("s"))
    assert shutdown_grace >= 5
    assert grace >= pre_stop + app_drain + shutdown_grace + 2, (grace, pre_stop, app_drain, shutdown_grace)
    assert grace <= pre_stop + app_drain + shutdown_grace + 15, "a much longer grace only slows rollouts"


def test_containers_are_locked_down(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for container in spec["initContainers"] + spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert not context["capabilities"].get("add"), container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_the_image_user_matches_the_pod(pod: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile, re.MULTILINE)
    assert int(user[0]) == pod["spec"]["securityContext"]["runAsUser"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_selectors_match(objects: list[dict[str, Any]], pod: dict[str, Any]) -> None:
    labels = pod["metadata"]["labels"]
    deployment = find(objects, "Deployment")
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert _selects(service["spec"]["selector"], labels), service["metadata"]["name"]
    pdb = find(objects, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["replicas"] > pdb["spec"]["maxUnavailable"]


def test_service_monitor_finds_the_metrics_port(objects: list[dict[str, Any]], sidecar: dict[str, Any]) -> None:
    monitor = find(objects, "ServiceMonitor")
    services = [
        s for s in objects
        if s["kind"] == "Service" and _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["shop-tidegate-metrics"]
    (service,) = services
    assert service["spec"]["publishNotReadyAddresses"] is True, "unready sidecars must still be scraped"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        port = ports[endpoint["port"]]
        assert port["targetPort"] in {p["name"] for p in sidecar["ports"]}
        assert endpoint["path"] == "/metrics"
        job = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        assert [r["replacement"] for r in job] == ["tidegate"], "the alerts and dashboard select job=tidegate"


def test_kustomize_hashes_generated_names() -> None:
    """Generated ConfigMap/Secret names get a hash, and the Deployment follows them (a change rolls pods)."""
    rendered = kustomize(OVERLAY)
    config_map = find(rendered, "ConfigMap")
    secret = find(rendered, "Secret")
    assert re.fullmatch(r"tidegate-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    assert re.fullmatch(r"shop-db-[a-z0-9]{10}", secret["metadata"]["name"])
    text = json.dumps(find(rendered, "Deployment"))
    assert config_map["metadata"]["name"] in text and secret["metadata"]["name"] in text
    assert all(o["metadata"].get("namespace") == "shop" for o in rendered)
