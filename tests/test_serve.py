"""REST serving with a real `mlflow models serve` process on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
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
