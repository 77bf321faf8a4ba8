"""The committed OpenAPI schema (docs/openapi.json) matches the app, and property-based
fuzzing from it (schemathesis) against a real `memlayer serve` finds no 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")
import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from server_process import ADMIN_HEADERS, new_tenant, serve

from memlayer.integrations.server.app import openapi_document

COMMITTED = Path(__file__).parent.parent / "docs" / "openapi.json"
REGENERATE = (
    'python -c "import json; from memlayer.integrations.server.app import openapi_document; '
    'print(json.dumps(openapi_document(), indent=2, sort_keys=True))" > docs/openapi.json'
)


def test_committed_openapi_matches_the_app() -> None:
    assert json.loads(COMMITTED.read_text()) == openapi_document(), f"regenerate: {REGENERATE}"


def test_no_route_takes_a_tenant_from_the_request() -> None:
    document = openapi_document()
    for path, operations in document["paths"].items():
        if path.startswith("/v1/tenants"):
            continue  # the admin API names tenants; it takes no API key
        assert "tenant" not in path
        for operation in operations.values():
            names = [p["name"] for p in operation.get("parameters", [])]
            assert "tenant_id" not in names, path
    for name, model in document["components"]["schemas"].items():
        if name.endswith("In") and name != "TenantIn":
            assert "tenant_id" not in model.get("properties", {}), name


SCHEMA = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    with serve(str(tmp_path_factory.mktemp("fuzzed"))) as url, httpx.Client() as http:
        _, key = new_tenant(http, url)
        http.post(
            f"{url}/v1/memories/bulk",
            headers=key,
            json={"items": [{"text": "seed memory", "id": "seed"}], "user_id": "ada"},
        )
        yield url, key


@SCHEMA.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzing_from_the_schema_finds_no_server_error(
    case: Any, served: tuple[str, dict[str, Any]]
) -> None:
    url, key = served
    headers = ADMIN_HEADERS if case.path.startswith("/v1/tenants") else key
    response = case.call(base_url=url, headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "field"}, error
