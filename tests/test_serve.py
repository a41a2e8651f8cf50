"""REST serving with a real `mlflow models serve` process on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture
def server(world, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"], "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", world["trained"]["model_uri"],
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not start:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_rest_round_trip_matches_in_process_prediction(world, server):
    stack = (np.random.default_rng(2).random((2, 30, 45)) * 255).round().astype(np.float32)
    answer = post(f"{server}/invocations", {"inputs": stack.tolist(), "params": {"output": "probability"}})
    served = np.array(answer["predictions"], np.float32)
    local = mlflow.pyfunc.load_model(world["trained"]["model_uri"]).predict(stack, params={"output": "probability"})
    assert served.shape == (2, 30, 45)
    np.testing.assert_allclose(served, local, atol=1e-5)
    mask = np.array(post(f"{server}/invocations", {"inputs": stack[0].tolist()})["predictions"])
    assert mask.shape == (30, 45) and set(np.unique(mask)) <= {0, 1}


def post_error(url: str, payload) -> tuple[int, dict]:
    """Status and JSON body of a request that the server answers with an error."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("payload, message", [
    ({"inputs": [["a", "b"], ["c", "d"]]}, "expected numeric pixels"),
    ({"inputs": np.zeros((1, 1, 2, 4, 4)).tolist()}, "expected an (H, W) image or a (Z, H, W) stack"),
    ({"inputs": np.zeros((8, 8)).tolist(), "params": {"output": "outline"}}, "output must be one of mask, probability, labels"),
    ({"inputs": np.zeros((8, 8)).tolist(), "params": {"tile_size": 0}}, "tile_size >= 1"),
    ({"inputs": np.zeros((8, 8)).tolist(), "params": {"low": 10.0}}, "pass both low and high"),
    ({"inputs": np.zeros((8, 8)).tolist(), "params": {"tile_size": "big"}}, "tile_size"),
])
def test_a_bad_request_is_a_400_with_one_message_and_no_stack_trace(server, payload, message):
    """MLflow's scoring server answers an unexpected exception with a generic message and the server's
    whole stack trace, file paths included. The pyfunc raises its input errors as MLflow's own
    INVALID_PARAMETER_VALUE, which the server passes through as HTTP 400 with our message alone."""
    status, body = post_error(f"{server}/invocations", payload)
    assert status == 400, body
    assert message in body["message"], body
    assert "stack_trace" not in body and "Traceback" not in body["message"] and "site-packages" not in body["message"]
    assert "unexpected error while evaluating the model" not in body["message"]


def test_rest_clients_send_one_slice_with_the_stacks_window(world, server):
    """The natural REST call sends one slice; with the stack's `low` / `high` it is segmented exactly as
    inside the whole stack."""
    from emunet.core.normalize import stack_stats

    stack = (np.random.default_rng(4).random((3, 30, 45)) * np.array([60, 140, 255])[:, None, None]).astype(np.float32)
    whole = np.array(post(f"{server}/invocations", {"inputs": stack.tolist(), "params": {"output": "probability"}})["predictions"])
    low, high = stack_stats(stack)
    params = {"output": "probability", "low": low, "high": high}
    one = np.array(post(f"{server}/invocations", {"inputs": stack[0].tolist(), "params": params})["predictions"])
    np.testing.assert_allclose(one, whole[0], atol=1e-5)
