"""OpenAPI 3.1 document derived from the method table: nothing here is written by hand per method."""

from __future__ import annotations

from functools import cache

from pydantic.json_schema import models_json_schema

from jobforge.models import METHODS


@cache
def openapi_document() -> dict:
    models = [(m.params, "validation") for m in METHODS.values()] + [(m.result, "serialization") for m in METHODS.values()]
    refs, schema = models_json_schema(models, ref_template="#/components/schemas/{model}")
    error = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "integer"}, "message": {"type": "string"}, "data": {}}, "required": ["code", "message"]}}}
    paths = {}
    for name, method in METHODS.items():
        paths[f"/json/{name}"] = {"post": {
            "operationId": name,
            "summary": method.summary,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": refs[(method.params, "validation")]}}},
            "responses": {
                "200": {"description": "result", "content": {"application/json": {
                    "schema": refs[(method.result, "serialization")]}}},
                **{str(code): {"description": text, "content": {"application/json": {"schema": error}}}
                   for code, text in ((400, "invalid params"), (404, "unknown job"), (409, "conflict"),
                                      (413, "body too large"))},
            },
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Job Forge", "version": "1"},
        "paths": paths,
        "components": {"schemas": schema.get("$defs", {})},
    }
