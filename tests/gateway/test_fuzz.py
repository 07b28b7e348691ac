"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis): no 500, no crash, and every
answer matches the schema (status codes, content types, bodies).

Runs against the app over real HTTP with fake executors, in positive (schema-valid) and negative
(schema-breaking) modes; ``tests/e2e/test_stack.py`` runs a smaller round against the real stack.
"""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from blockmgr.manager import BlockManager
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.fakes import BlockManagerConnection, fake_app, serve_in_thread

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


def _schema_only_app():
    settings = GatewaySettings(model="unused", served_model_name="fake-model", executors=[], blockmgr="",
                               max_model_len=2048)
    return create_app(settings, executors=[], blockmgr=BlockManagerConnection(), tokenizer=object())


SCHEMA = schemathesis.openapi.from_dict(_schema_only_app().openapi())
SCHEMA.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], allow_x00=True)


@pytest.fixture(scope="module")
def live(tok):
    # The small KV pool bounds how much work a random (valid) request can ask for. The block manager
    # is the real one, so the cache endpoints (lookup, pins, ...) are fuzzed against it.
    app, executors, _ = fake_app(tok, num_executors=2, executor_kwargs={"num_blocks": 64},
                                 manager=BlockManager(watermark=0, pin_share=0.5))
    with serve_in_thread(app) as base:
        yield {"base": base, "executors": executors}
    # The server survived every case: it shut down cleanly above; the fakes ended every request.
    assert all(ex.num_active == 0 for ex in executors)


@SCHEMA.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_error_and_schema_conformance(case, live):
    response = case.call(base_url=live["base"], timeout=30)
    negative = case.meta is not None and getattr(case.meta.generation, "mode", None) == GenerationMode.NEGATIVE
    case.validate_response(response, checks=NEGATIVE_CHECKS if negative else CHECKS)


def test_server_still_serves_after_fuzzing(live):
    r = httpx.post(live["base"] + "/v1/completions", json={"prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(live["base"] + "/health").status_code == 200
