"""The service survives what one request can do to it: long histories are cut to the training max_len
(and the answer says so), a failing or stuck forward fails only its own requests, /health is liveness and
/ready a real recommendation, bodies are strict JSON of bounded size, SIGTERM drains and exits within a
bound, and a bad --port or a busy one is one line with exit code 2. Real uvicorn servers on 127.0.0.1
and a real HTTP client; the model's failures (an allocation that fails, a forward that hangs) are
injected into the recommender, the only faults that cannot be caused cheaply for real.

    .venv/bin/python -m pytest -q tests/integration/test_serve.py
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn

from deploy import load_recommender
from deploy.options import ServiceOptions
from deploy.serve import create_app, listening_socket
from models.fmrl import FMRLConfig, FMRLRec
from trainer.export import ItemCatalog, export_model

NUM_ITEMS = 300
MAX_LEN = 20
POISON = "item-299"
"""A history holding this item makes the injected fault fire."""


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    """An export of a random size-8/16 model trained (so it records) with max_len 20."""
    torch.manual_seed(0)
    cfg = FMRLConfig(nested_sizes=[8, 16], num_blocks=1, use_id_embedding=True, complex_init="random")
    features = torch.randn(NUM_ITEMS + 1, 12)
    features[0] = 0
    model = FMRLRec(cfg, NUM_ITEMS, text_features=features).eval()
    popularity = torch.arange(NUM_ITEMS + 1, dtype=torch.float32)
    popularity[0] = 0
    catalog = ItemCatalog([""] + [f"item-{i}" for i in range(1, NUM_ITEMS + 1)], popularity)
    out = str(tmp_path_factory.mktemp("serve") / "export")
    export_model(model, out, [8, 16], catalog=catalog, max_len=MAX_LEN)
    return out


def _faulty(recommender, fault):
    """``recommender`` whose forward runs ``fault()`` first when a history holds :data:`POISON`."""
    poison = int(POISON.removeprefix("item-"))
    real = recommender.recommend

    def recommend(histories, k=10, exclude_history=True):
        if any(poison in history for history in histories):
            fault()
        return real(histories, k, exclude_history)

    recommender.recommend = recommend
    return recommender


def _out_of_memory() -> None:
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 51 GB"
    )


@pytest.fixture
def in_process():
    """Serve an app with uvicorn in a thread of this process (real sockets, real HTTP); yields a function
    app -> URL. The servers stop at the end of the test."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app) -> str:
        sock = listening_socket("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        servers.append((server, thread))
        return url

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def _body(history: list[str], k: int = 5) -> dict:
    return {"history": history, "k": k}


def test_a_failing_forward_fails_only_its_requests_and_the_service_goes_on(
    export_dir, in_process, caplog
) -> None:
    rec = _faulty(load_recommender(export_dir, 16), _out_of_memory)
    options = ServiceOptions(batch_wait_ms=500)  # the three requests below go through one forward
    url = in_process(create_app(rec, {}, options))
    bodies = [_body(["item-5", POISON]), _body(["item-5", "item-6"]), _body(["item-7"])]
    with caplog.at_level(logging.ERROR, logger="fmrl.serve"), ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}/recommend", json=b, timeout=10), bodies))
    assert answers[0].status_code == 500
    assert "RuntimeError" in answers[0].text and "can't allocate memory" in answers[0].text
    for body, answer in zip(bodies[1:], answers[1:]):
        assert answer.status_code == 200, answer.text
        history = [int(item.removeprefix("item-")) for item in body["history"]]
        assert answer.json()["ids"] == rec.recommend([history], 5)[1][0].tolist()
    assert any(r.exc_info and "can't allocate memory" in str(r.exc_info[1]) for r in caplog.records)
    # the batcher went on: later requests are answered, and it is still live
    assert httpx.post(f"{url}/recommend", json=_body(["item-9"]), timeout=10).status_code == 200
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/info").json()["model_failures"] >= 1


def test_health_is_liveness_and_ready_is_a_real_recommendation(export_dir, in_process) -> None:
    rec = load_recommender(export_dir, 16)
    app = create_app(rec, {}, ServiceOptions(request_timeout_s=0.5))
    url = in_process(app)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    before = httpx.get(f"{url}/info").json()["requests"]
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert httpx.get(f"{url}/info").json()["requests"] == before + 1  # it went through the batcher
    # the batching task ends (as an unexpected error once ended it): not live, not ready
    task = app.state.batcher.task
    task.get_loop().call_soon_threadsafe(task.cancel)
    time.sleep(0.2)
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and "not running" in health.json()["reason"]
    assert httpx.get(f"{url}/ready").status_code == 503


def test_a_request_not_answered_in_time_gets_504_and_leaves_the_queue(export_dir, in_process) -> None:
    rec = _faulty(load_recommender(export_dir, 16), lambda: time.sleep(1.5))  # a forward that takes long
    options = ServiceOptions(max_batch=1, request_timeout_s=0.5)
    url = in_process(create_app(rec, {}, options))
    bodies = [_body([POISON]), _body(["item-5"])]  # the second waits in the queue behind the first
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.post, f"{url}/recommend", json=bodies[0], timeout=10)
        time.sleep(0.1)
        queued = pool.submit(httpx.post, f"{url}/recommend", json=bodies[1], timeout=10)
        time.sleep(0.6)
        stuck = httpx.get(f"{url}/health")  # the forward has outlasted the request timeout
        for answer in (slow.result(), queued.result()):
            assert answer.status_code == 504 and "no answer within 0.5 s" in answer.text
    assert stuck.status_code == 503 and "one forward has been running" in stuck.json()["reason"]
    time.sleep(1.2)  # the slow forward ends; the queued request was dropped, not computed
    info = httpx.get(f"{url}/info").json()
    assert info["requests"] == 1 and info["batches"] == 1
    assert httpx.post(f"{url}/recommend", json=_body(["item-5"]), timeout=10).status_code == 200
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_process(export_dir: str, *options: str) -> tuple[subprocess.Popen, str]:
    """`fmrl serve` of ``export_dir`` as a real process on a free port, once /health answers."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trainer.cli", "serve", export_dir, "--size", "16", "--port", str(port)]
    process = subprocess.Popen([*command, *options], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the service did not answer /health"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def service(export_dir) -> Iterator[str]:
    process, url = _serve_process(export_dir)
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_a_long_history_keeps_its_last_max_len_items_and_the_answer_says_so(service, export_dir) -> None:
    history = [f"item-{1 + i % NUM_ITEMS}" for i in range(10_000)]  # the most the service accepts
    start = time.monotonic()
    answer = httpx.post(f"{service}/recommend", json=_body(history, 10), timeout=60)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - start < 10
    reply = answer.json()
    assert reply["history_used"] == MAX_LEN and reply["history_dropped"] == 10_000 - MAX_LEN
    last = [int(item.removeprefix("item-")) for item in history[-MAX_LEN:]]
    assert reply["ids"] == load_recommender(export_dir, 16).recommend([last], 10)[1][0].tolist()
    short = httpx.post(f"{service}/recommend", json=_body(["item-3"])).json()
    assert short["history_used"] == 1 and short["history_dropped"] == 0
    info = httpx.get(f"{service}/info").json()
    assert info["max_len"] == MAX_LEN and info["history_limit"] == MAX_LEN


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"history": ["item-5"], "k": "10"}', "k: Input should be a valid integer"),
        (b'{"history": ["item-5"], "k": true}', "k: Input should be a valid integer"),
        (b'{"history": ["item-5"], "k": 5.0}', "k: Input should be a valid integer"),
        (b'{"history": ["item-5"], "k": NaN}', "k: Input should be a valid integer"),
        (b'{"history": ["item-5"], "k": Infinity}', "k: Input should be a valid integer"),
        (b'{"history": ["item-5", -Infinity], "k": 3}', "history.1: Input should be an item id"),
        (b'{"history": ["item-5", true], "k": 3}', "history.1: Input should be an item id"),
        (b'{"history": ["item-5"], "k": 3, "K": 4}', "K: Extra inputs are not permitted"),
    ],
)
def test_bodies_are_strict_json(service, body, message) -> None:
    response = httpx.post(f"{service}/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_a_body_without_the_json_content_type_is_read_as_json(service) -> None:
    # what `curl -d '{...}'` sends: application/x-www-form-urlencoded
    body = json.dumps(_body(["item-5", "item-6"]))
    response = httpx.post(
        f"{service}/recommend", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 200, response.text
    broken = httpx.post(
        f"{service}/recommend", content=b"history=item-5", headers={"content-type": "text/plain"}
    )
    assert broken.status_code == 422 and "Content-Type: application/json" in broken.text


def test_a_body_over_the_limit_gets_413(service) -> None:
    limit = ServiceOptions.max_body_bytes
    padding = json.dumps(_body(["item-5"] * 9_000) | {"note": "x" * limit}).encode()
    declared = httpx.post(f"{service}/recommend", content=padding)
    assert declared.status_code == 413 and f"larger than {limit} bytes" in declared.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for start in range(0, len(padding), 65_536):
            yield padding[start : start + 65_536]

    streamed = httpx.post(f"{service}/recommend", content=chunks())
    assert streamed.status_code == 413


def test_a_lower_history_cap_is_used_and_sigterm_drains(export_dir) -> None:
    # --batch-wait-ms keeps a request in flight long enough to send SIGTERM meanwhile
    process, url = _serve_process(export_dir, "--max-history", "5", "--batch-wait-ms", "1500")
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{url}/recommend", json=_body(["item-1"] * 8), timeout=30)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):  # new connections are refused
                httpx.post(f"{url}/recommend", json=_body(["item-2"]), timeout=5)
            answer = in_flight.result()
        assert answer.status_code == 200, answer.text
        assert answer.json()["history_used"] == 5 and answer.json()["history_dropped"] == 3
        process.wait(timeout=15)
        assert time.monotonic() - sent < 5
        assert process.returncode == -signal.SIGTERM  # drained, then ended by the signal itself
    finally:
        process.kill()
        process.wait()


STUCK = """
import sys, time
from deploy import load_recommender
from deploy.options import ServiceOptions
from deploy.serve import create_app, listening_socket, serve
rec = load_recommender(sys.argv[1], 16)
rec.recommend = lambda histories, k=10, exclude_history=True: time.sleep(600)  # a forward that never ends
sock = listening_socket("127.0.0.1", int(sys.argv[2]))
serve(create_app(rec, {}, ServiceOptions(request_timeout_s=600)), sock, drain_timeout_s=1.0)
"""


def test_sigterm_ends_the_process_within_the_drain_bound_even_with_a_stuck_forward(export_dir) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", STUCK, export_dir, str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(httpx.post, f"{url}/recommend", json=_body(["item-1"]), timeout=30)
            time.sleep(0.5)  # the forward is now stuck in its thread
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            process.wait(timeout=30)
        assert time.monotonic() - sent < 5  # drain_timeout_s = 1, plus uvicorn's ticks
    finally:
        process.kill()
        process.wait()


def test_a_bad_or_busy_port_is_one_line_and_exit_code_2(export_dir) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trainer.cli", "serve", export_dir, "--size", "16", "--port"]
    bad = subprocess.run([*command, "99999"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--port: 99999 is out of range: must be in 1..65535" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([*command, str(port)], env=env, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2, busy.stderr
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], busy.stderr
    assert "address already in use" in lines[0]
