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
                   for code, text in ((400, "invalid params"), (401, "missing or unknown bearer token"),
                                      (403, "the token may not act for that owner"), (404, "unknown job"),
                                      (409, "conflict"), (413, "body too large"),
                                      (415, "Content-Type is not application/json"),
                                      (421, "Host header names no address of this service"))},
            },
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Job Forge", "version": "1"},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {"schemas": schema.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a token of JOBFORGE_API_TOKENS_FILE"}}},
    }
