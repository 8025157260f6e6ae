"""compose.yaml agrees with the code: settings, runtimes, the model store, images, health checks.

The suite reads the file; scripts/compose-check runs it for real (after the suite in CI). The
NATS configs it mounts are started for real in test_nats_permissions.py and test_cluster.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import msgspec
import pytest
import yaml

from dalston.bus.permissions import COMPOSE_ENGINES, SERVICE_USERS, engine_user, password_variable
from dalston.catalog import Catalog
from dalston.cli.health import CHECKS
from dalston.config import Settings
from dalston.services.engine_users import compose_users_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
# Dalston's own services are the ones built from this repository; nats is an upstream image.
DALSTON = {name: spec for name, spec in SERVICES.items() if "build" in spec}
ENGINES = {name: spec for name, spec in DALSTON.items() if "DALSTON_RUNTIME" in spec["environment"]}
SETTINGS_VARS = {f"DALSTON_{f.encode_name.upper()}" for f in msgspec.structs.fields(Settings)}
# Services that speak to NATS as another does: the Wyoming server submits as the gateway.
NATS_USER_OF = {"wyoming": "gateway", "layout": "admin"}


def test_compose_yaml_meets_the_compose_specification():
    """The schema Docker Compose validates with before `docker compose config` (vendored in
    tests/data/compose-spec: Docker Compose cannot be installed here; podman-compose runs it)."""
    schema = json.loads((ROOT / "tests/data/compose-spec/compose-spec.json").read_text())
    problems = [f"{'/'.join(map(str, e.path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(COMPOSE)]
    assert problems == []
    assert "version" not in COMPOSE  # obsolete: docker compose warns of it


def test_every_service_is_there():
    assert {"nats", "gateway", "orchestrator", "audio-prepare", "merge", "diarize", "redact", "faster-whisper-1",
            "faster-whisper-2", "nemo"} <= set(SERVICES)
    assert set(ENGINES) == {"audio-prepare", "merge", "diarize", "redact", "faster-whisper-1", "faster-whisper-2",
                            "nemo"}


@pytest.mark.parametrize("name", sorted(DALSTON))
def test_environment_is_settings(name):
    env = DALSTON[name]["environment"]
    unknown = {var for var in env if var.startswith("DALSTON_")} - SETTINGS_VARS
    assert not unknown, f"{name}: not fields of dalston.config.Settings: {unknown}"
    assert env["DALSTON_NATS_URL"] == "nats://nats:4222"
    assert "DALSTON_NATS_REPLICAS" in env
    # Each service its own NATS user, whose password the nats service knows.
    user = env["DALSTON_NATS_USER"]
    assert user == (engine_user(name) if name in ENGINES else NATS_USER_OF.get(name, name))
    assert env["DALSTON_NATS_PASSWORD"] == SERVICES["nats"]["environment"][password_variable(user)]


def test_each_engine_service_has_its_user_in_the_nats_config():
    """One NATS user per engine service, generated from the one template: the checked-in
    nats/users.conf is the generator's output for compose's engines and the catalog."""
    assert {name: spec["environment"]["DALSTON_RUNTIME"] for name, spec in ENGINES.items()} == COMPOSE_ENGINES
    assert (ROOT / "nats/users.conf").read_text() == compose_users_config(Catalog.load(), ROOT / "nats")
    assert set(SERVICES["nats"]["environment"]) == {
        password_variable(user) for user in [*SERVICE_USERS, *map(engine_user, COMPOSE_ENGINES)]}


def test_the_layout_is_applied_as_admin_before_every_service():
    """Only admin may create streams, buckets and consumers (nats/accounts.conf)."""
    assert SERVICES["layout"]["command"] == ["serve", "layout"]
    for name in set(DALSTON) - {"layout"}:
        assert "layout" in SERVICES[name]["depends_on"], name


def test_engine_runtimes_are_in_the_catalog():
    runtimes = Catalog.load().runtimes
    for name, spec in ENGINES.items():
        assert spec["environment"]["DALSTON_RUNTIME"] in runtimes, name


@pytest.mark.parametrize("name", ["gateway", "wyoming", *sorted(ENGINES)])
def test_models_volume_is_the_store(name):
    spec = DALSTON[name]
    store = spec["environment"]["DALSTON_MODELS_DIR"]
    assert f"models:{store}" in spec["volumes"]
    assert "models" in COMPOSE["volumes"]


def test_dockerfiles_exist_and_take_the_runtime():
    for name, spec in DALSTON.items():
        dockerfile = ROOT / spec["build"]["context"] / spec["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        args = spec["build"].get("args", {})
        if "RUNTIME" in args:
            assert args["RUNTIME"] == spec["environment"]["DALSTON_RUNTIME"]
    runtime_dockerfile = (ROOT / "docker/runtime.Dockerfile").read_text()
    assert "ARG RUNTIME" in runtime_dockerfile and "python:3.11-slim" in runtime_dockerfile


def test_no_two_engines_share_a_user():
    """Engines of one user could hear each other's live sessions: two faster-whisper engines are
    two services, with users of their own, and no service has replicas."""
    users = [spec["environment"]["DALSTON_NATS_USER"] for spec in ENGINES.values()]
    assert len(users) == len(set(users))
    assert not [name for name, spec in SERVICES.items() if "replicas" in spec.get("deploy", {})]
    for name in ("faster-whisper-1", "faster-whisper-2"):
        assert "container_name" not in SERVICES[name] and "ports" not in SERVICES[name]


def test_no_empty_default_podman_compose_1_keeps_as_it_is():
    """podman-compose 1.0 does not expand `${VAR:-}` (nor `${VAR-}`): the service got the text."""
    def values(node):
        if isinstance(node, dict):
            yield from (v for value in node.values() for v in values(value))
        elif isinstance(node, list):
            yield from (v for value in node for v in values(value))
        elif isinstance(node, str):
            yield node
    assert [value for value in values(COMPOSE) if re.search(r"\$\{\w+:?-\}", value)] == []


def test_nemo_reserves_a_gpu_behind_a_profile():
    spec = SERVICES["nemo"]
    assert spec["profiles"] == ["nemo"]
    devices = spec["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert spec["build"]["args"]["EXTRAS"] == "nemo"


def test_gateway_listens_beyond_loopback():
    # ... which makes API keys mandatory (dalston/services/gateway/auth.py).
    env = SERVICES["gateway"]["environment"]
    assert env["DALSTON_HTTP_HOST"] == "0.0.0.0"
    assert SERVICES["gateway"]["ports"] == [f"{env['DALSTON_HTTP_PORT']}:{env['DALSTON_HTTP_PORT']}"]


def test_wyoming_listens_beyond_loopback_behind_a_profile_with_its_key():
    # ... which makes its key mandatory (dalston/services/wyoming/server.py).
    spec = SERVICES["wyoming"]
    env = spec["environment"]
    assert spec["profiles"] == ["wyoming"] and spec["command"] == ["serve", "wyoming"]
    assert env["DALSTON_WYOMING_HOST"] == "0.0.0.0" and "DALSTON_WYOMING_API_KEY" in env
    assert spec["ports"] == [f"{env['DALSTON_WYOMING_PORT']}:{env['DALSTON_WYOMING_PORT']}"]


@pytest.mark.parametrize("name", sorted(DALSTON))
def test_health_checks(name):
    # A plain command string: podman-compose 1.0 mangles list forms shared through an anchor.
    test = SERVICES[name]["healthcheck"]["test"]
    expected = "engine" if name in ENGINES else name
    assert test == f"dalston health {expected}"
    assert expected in CHECKS


def test_nats_health_check_and_image():
    spec = SERVICES["nats"]
    assert "http://127.0.0.1:8222/healthz?js-enabled-only=true" in spec["healthcheck"]["test"]
    # The official image unless DALSTON_NATS_IMAGE names another (compose-check --local-base).
    assert spec["image"] == "${DALSTON_NATS_IMAGE:-nats:2.15-alpine}"


def test_only_the_gateway_and_wyoming_are_published():
    # Wyoming only behind its profile, and with its key (the test above).
    assert [name for name, spec in SERVICES.items() if spec.get("ports")] == ["gateway", "wyoming"]


def test_base_image_is_a_build_argument():
    for name, spec in DALSTON.items():
        assert spec["build"]["args"]["BASE"] == "${DALSTON_BASE_IMAGE:-python:3.11-slim}", name
    for dockerfile in ("service", "runtime"):
        text = (ROOT / f"docker/{dockerfile}.Dockerfile").read_text()
        assert "ARG BASE=python:3.11-slim\nFROM ${BASE}\n" in text, dockerfile


def test_nats_mounts_its_config_and_keeps_jetstream():
    spec = SERVICES["nats"]
    assert "./nats:/etc/nats:ro" in spec["volumes"]
    config = spec["command"][spec["command"].index("-c") + 1]
    assert (ROOT / "nats" / Path(config).name).is_file()
    data = spec["command"][spec["command"].index("-sd") + 1]
    assert f"nats-data:{data}" in spec["volumes"]
    assert "include users.conf" in (ROOT / "nats/compose.conf").read_text()
    assert 'include "accounts.conf"' in (ROOT / "nats/users.conf").read_text()
