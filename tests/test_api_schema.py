"""The API against its own OpenAPI schema: property-based requests from schemathesis, sent to a real
uvicorn process serving a tiny checkpoint, ADMIN_TOKEN set so ``POST /admin/reload`` is in the
schema and tested too (with and without the token).

For every operation, schemathesis generates requests from the schema (valid ones, and invalid ones:
wrong types, missing fields, odd multipart bodies) and checks each response: never a 5xx, a status
code the schema documents for the operation, a content type it documents, and a body that validates
against the documented schema. Hypothesis is derandomized, so a CI run repeats the same requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from tests.utils.service import clean_service_env, uvicorn_server, write_model

TOKEN = "schema-test-admin-token-0123456789"
# Every operation of the service; test_every_operation_is_tested keeps the list complete.
OPERATIONS = [
    "GET /healthz",
    "GET /readyz",
    "GET /model",
    "POST /predict",
    "POST /predict/batch",
    "POST /predict/video",
    "GET /metrics",
    "POST /admin/reload",
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Requests per operation. 100 is what it takes for the negative multipart bodies to include one the
# parser rejects (a 400 that /predict/batch once failed to document); ~15 s for all seven on 2 cores.
EXAMPLES = 100


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("schema") / "uvicorn.log"


@pytest.fixture(scope="module")
def api_schema(server_log: Path) -> Iterator[schemathesis.BaseSchema]:
    checkpoint = write_model(server_log.parent / "model.pt")
    with pytest.MonkeyPatch.context() as mp:
        clean_service_env(mp)  # this shell's service variables and OTEL_* do not reach the server
        env = {"MODEL_URI": str(checkpoint), "ADMIN_TOKEN": TOKEN, "INFERENCE_THREADS": "1", "MAX_CONCURRENT_INFERENCES": "1"}
        with uvicorn_server(server_log, **env) as base:
            schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
            assert "/admin/reload" in schema.raw_schema["paths"]
            yield schema


def check_operation(operation: APIOperation, examples: int = EXAMPLES) -> None:
    """``examples`` requests generated for ``operation``, half with the admin token, each response checked."""
    # Valid requests, and invalid ones (wrong types, missing or extra fields, odd multipart bodies).
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=cases, authorized=st.booleans())
    @settings(
        max_examples=examples,
        derandomize=True,  # the same requests on every run
        deadline=None,  # a request to a real server: its timing is the machine's, not the property's
        database=None,  # no .hypothesis/ folder: nothing but the derandomized seed decides the examples
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case, authorized: bool) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else None
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=120)

    check()


@pytest.mark.slow
@pytest.mark.parametrize("label", OPERATIONS)
def test_api_conforms_to_its_schema(api_schema: schemathesis.BaseSchema, label: str) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    check_operation(operation)


def test_every_operation_is_tested(api_schema: schemathesis.BaseSchema) -> None:
    """The property test covers every operation the service has, the admin one included."""
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


def test_batch_documents_a_malformed_body(api_schema: schemathesis.BaseSchema) -> None:
    """Found by schemathesis: a multipart body the parser cannot read is a 400 the batch route did not document."""
    responses = api_schema.raw_schema["paths"]["/predict/batch"]["post"]["responses"]
    assert {"200", "400", "413", "422", "503"} <= set(responses)


def test_no_request_logged_an_error(api_schema: schemathesis.BaseSchema, server_log: Path) -> None:
    """After the property test (this file's order): no request made the server log an error, e.g.
    an unhandled exception answered 500 (which the checks would also have caught) or one swallowed."""
    lines = server_log.read_text().splitlines()
    assert not [line for line in lines if '"severity": "ERROR"' in line or "Traceback" in line]
