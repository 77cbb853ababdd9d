"""The served OpenAPI document matches the routes the API registers, and responses match it."""

from __future__ import annotations

import re
from typing import Any

from dispatcher.web import admin_api as api_module
from dispatcher.web import openapi
from tests.integration.api_support import Client, api

__all__ = ["api"]  # the fixture, imported for pytest

_METHODS = {"get", "post", "put", "patch", "delete"}


def _documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_every_route_is_documented_and_nothing_else() -> None:
    registered = {(method, path) for method, path, _handler in api_module.ROUTES}
    assert registered == _documented()


def test_path_parameters_are_declared() -> None:
    for path, item in openapi.document()["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == declared, path


def test_every_reference_resolves() -> None:
    doc = openapi.document()
    schemas = doc["components"]["schemas"]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                assert ref.removeprefix("#/components/schemas/") in schemas, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)


async def test_the_document_is_served_under_v1(api: Client) -> None:
    reply = await api.get("/openapi.json")
    assert reply.status == 200
    assert reply.body == openapi.document()
    assert reply.body["openapi"].startswith("3.")
    # The aiohttp app serves exactly the documented (method, path) pairs plus the catch-all.
    app = api_module.build(
        None,  # type: ignore[arg-type]
        token="t",
        policy=None,  # type: ignore[arg-type]
        signers=None,  # type: ignore[arg-type]
    )
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("HEAD", "*") and route.resource is not None
    }
    assert served == _documented()


def test_free_text_query_parameters_state_that_nul_is_refused() -> None:
    """The validators refuse NUL in every text the API takes; a string query parameter without
    an enum, format or pattern would let a client (and schemathesis) think it is allowed."""
    loose = [
        (path, method, p["name"])
        for path, item in openapi.document()["paths"].items()
        for method, op in item.items()
        if method in _METHODS
        for p in op.get("parameters", [])
        if p["in"] == "query"
        and p["schema"].get("type") == "string"
        and not {"enum", "format", "pattern"} & p["schema"].keys()
    ]
    assert loose == []
