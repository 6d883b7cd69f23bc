"""The real judge endpoint for the scoring tests: llama.cpp's server serving SmolLM2 on loopback."""

import os

import pytest

from judge_server import LlamaServer, llama_server_missing


@pytest.fixture(scope="module")
def server():
    """Skipped (with the install command) only when llama-cpp-python is not installed; with
    UAL_REQUIRE_JUDGE_SERVER=1 that is a failure instead (CI)."""
    why = llama_server_missing()
    if why:
        if os.environ.get("UAL_REQUIRE_JUDGE_SERVER"):
            pytest.fail(why)
        pytest.skip(why)
    with LlamaServer() as srv:
        yield srv
