"""The deploy package: an export read with torch, safetensors and fsspec only scores like the training
model at every size, recommends without the history, quantises and funnels with measured effect, and a
process using it never loads the training stack.

    .venv/bin/python -m pytest -q tests/integration/test_deploy.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deploy import Funnel, load_recommender
from deploy.costs import choose_size
from deploy.recommender import measure_export
from models.fmrl import FMRLConfig, FMRLRec, nested_scores
from trainer.export import ItemCatalog, export_model

SIZES = [8, 16, 32]
NUM_ITEMS = 300


@pytest.fixture(scope="module")
def trained() -> FMRLRec:
    """A model with random (untrained) weights: scoring only has to agree, not to be good."""
    torch.manual_seed(0)
    cfg = FMRLConfig(
        nested_sizes=SIZES, num_blocks=2, use_id_embedding=True, r_max=0.9, complex_init="random"
    )
    features = torch.randn(NUM_ITEMS + 1, 12)
    features[0] = 0
    return FMRLRec(cfg, NUM_ITEMS, text_features=features).eval()


@pytest.fixture(scope="module")
def export_dir(trained, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("deploy") / "export")
    popularity = torch.arange(NUM_ITEMS + 1, dtype=torch.float32)
    popularity[0] = 0
    catalog = ItemCatalog([""] + [f"item-{i}" for i in range(1, NUM_ITEMS + 1)], popularity)
    export_model(trained, out, SIZES, catalog=catalog)
    return out


def histories(batch: int = 6, length: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=generator)
    for row in range(batch):  # left padding of several lengths, one row with a single item
        tokens[row, : min(row * 2, length - 1)] = 0
    return tokens


def test_every_size_scores_like_the_training_models_prefix(trained, export_dir) -> None:
    tokens = histories()
    with torch.no_grad():
        hidden, items = trained(tokens)
        expected = nested_scores(hidden[:, -1], items[1:], SIZES)
    for size in SIZES:
        rec = load_recommender(export_dir, size)
        torch.testing.assert_close(rec.scores(tokens), expected[size], rtol=1e-5, atol=1e-5)
        # lists of ids (padded here) give the same answer as the left-padded tensor
        as_lists = [[int(i) for i in row if i > 0] for row in tokens]
        torch.testing.assert_close(rec.scores(as_lists), expected[size], rtol=1e-5, atol=1e-5)


def test_history_and_padding_are_never_recommended(export_dir) -> None:
    rec = load_recommender(export_dir, 32)
    tokens = histories()
    scores, ids = rec.recommend(tokens, k=NUM_ITEMS - tokens.shape[1])
    for row, history in enumerate(tokens):
        assert not set(ids[row].tolist()) & set(history[history > 0].tolist())
    assert bool((ids >= 1).all()) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    # the batch answer is each row's own answer
    _, single = rec.recommend(tokens[2:3], k=10)
    assert torch.equal(single[0], ids[2, :10])
    assert rec.source_ids(ids[:1, :2])[0] == [f"item-{i}" for i in ids[0, :2].tolist()]


@pytest.mark.parametrize("funnel", [None, Funnel(prefix=8, candidates=40)])
def test_a_batch_larger_than_the_score_budget_is_answered_a_few_rows_at_a_time(
    export_dir, monkeypatch, funnel
) -> None:
    import deploy.recommender

    rec = load_recommender(export_dir, 32, funnel=funnel)
    tokens = histories(16)
    whole = rec.recommend(tokens, 10)
    calls = []
    original = rec._top_k
    monkeypatch.setattr(rec, "_top_k", lambda t, k, e: calls.append(len(t)) or original(t, k, e))
    monkeypatch.setattr(deploy.recommender, "SCORES_AT_A_TIME", 3 * NUM_ITEMS)  # 3 histories' scores
    chunked = rec.recommend(tokens, 10)
    assert calls == [3, 3, 3, 3, 3, 1]  # never more than the budget's rows of (rows, N) scores
    assert torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[0], whole[0])  # a smaller matmul may round differently


def test_int8_item_table_scores_close_and_ranks_alike(export_dir) -> None:
    exact = load_recommender(export_dir, 32)
    quantised = load_recommender(export_dir, 32, quantised=True)
    assert quantised.model.item_values.dtype == torch.int8
    tokens = histories(32)
    full, approx = exact.scores(tokens), quantised.scores(tokens)
    assert (full - approx).abs().max() < 0.02 * full.abs().max()
    _, top_exact = exact.recommend(tokens, 10)
    _, top_quantised = quantised.recommend(tokens, 10)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_exact, top_quantised))
    assert overlap >= 0.8 * top_exact.numel()


def test_funnel_with_the_whole_catalog_as_shortlist_is_exact(export_dir) -> None:
    tokens = histories(16)
    exact_scores, exact = load_recommender(export_dir, 32).recommend(tokens, 10)
    wide = load_recommender(export_dir, 32, funnel=Funnel(prefix=8, candidates=NUM_ITEMS))
    scores, ids = wide.recommend(tokens, 10)
    assert torch.equal(ids, exact)
    torch.testing.assert_close(scores, exact_scores)
    narrow = load_recommender(export_dir, 32, funnel=Funnel(prefix=8, candidates=40))
    _, shortlisted = narrow.recommend(tokens, 10)
    for row, history in enumerate(tokens):
        assert not set(shortlisted[row].tolist()) & set(history[history > 0].tolist())
    ann = load_recommender(export_dir, 32, funnel=Funnel(prefix=8, candidates=NUM_ITEMS, ann=True))
    _, through_index = ann.recommend(tokens, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, through_index)) / exact.numel()
    assert recall >= 0.9


def test_a_size_for_a_budget(export_dir) -> None:
    table = measure_export(export_dir, repeats=2)
    assert [e["size"] for e in table] == SIZES
    small, large = table[0], table[-1]
    assert small["items_bytes"]["fp32"] == 4 * (NUM_ITEMS + 1) * 8
    assert small["items_bytes"]["int8"] < large["items_bytes"]["fp16"] < large["items_bytes"]["fp32"]
    memory = [(e["model_bytes"]["fp32"] + e["items_bytes"]["fp32"]) / 2**20 for e in table]
    assert choose_size(table).size == 32
    assert choose_size(table, max_memory_mb=(memory[0] + memory[1]) / 2).size == 8
    nothing = choose_size(table, max_memory_mb=memory[0] / 2)
    assert nothing.size is None and "size 8: memory" in nothing.reason
    # a budget on quality reads the quality as served (history masked), never the run's ranked one
    table[-1]["quality"] = {"NDCG@10": 0.05, "history": "masked"}
    table[-2]["quality"] = {"NDCG@10": 0.04, "history": "masked"}
    assert choose_size(table, min_ndcg=0.045).size == 32
    assert "test NDCG@10 unknown" in choose_size(table, min_ndcg=0.06).reason
    older = [{**entry, "quality": {"NDCG@10": 0.05}} for entry in table]  # an older `fmrl sizes`' table
    refused = choose_size(older, min_ndcg=0.01)
    assert refused.size is None and "size 32: test NDCG@10 not measured as served" in refused.reason
    # `fmrl sizes` saves the table beside the export; size="auto" reads it (else it measures)
    fingerprint = json.loads(open(f"{export_dir}/export.json").read())["fingerprint"]
    with open(f"{export_dir}/sizes.json", "w") as f:
        json.dump({"fingerprint": fingerprint, "sizes": table}, f)
    rec = load_recommender(export_dir, "auto", max_memory_mb=(memory[0] + memory[1]) / 2)
    assert rec.size == 8
    with pytest.raises(ValueError, match="no size fits the budget: size 8: memory"):
        load_recommender(export_dir, "auto", max_memory_mb=memory[0] / 2)
    assert load_recommender(export_dir, "auto", min_ndcg=0.045).size == 32


LOADED = """
import json, sys
from deploy import load_recommender
rec = load_recommender(sys.argv[1], 16)
rec.recommend([[1, 2, 3]], k=5)
import uvicorn  # what deploy.serve.main runs the app with
from deploy.serve import create_app, service_info
create_app(rec, service_info(sys.argv[1], rec, False, None))
print(json.dumps(sorted(sys.modules)))
"""


def test_a_service_process_loads_no_training_code(export_dir) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-c", LOADED, export_dir], capture_output=True, text=True, env=env, check=True
    ).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    assert {"torch", "fastapi", "uvicorn", "deploy", "safetensors"} <= loaded
    forbidden = {
        "trainer",
        "sharding",
        "data_pipeline",
        "torchrec",
        "fbgemm_gpu",
        "deepspeed",
        "transformers",
    }
    assert not loaded & forbidden, loaded & forbidden
    modules = set(json.loads(out))
    assert "models.dlrm" not in modules and "models.fmrl.model" in modules  # only the trunk's code


def test_concurrent_requests_go_through_one_batched_forward(export_dir) -> None:
    import asyncio

    from deploy.serve import Batcher

    rec = load_recommender(export_dir, 16)
    batcher = Batcher(rec, max_batch=64, wait_ms=1000.0, max_queue=16)
    requests = [([1, 2, 3], 5), ([7], 3), ([4, 4, 9, 11], 10), ([rec.num_items], 1)]

    async def scenario():
        worker = asyncio.create_task(batcher.run())
        # all four are queued before the worker first runs: one group, one forward
        answers = await asyncio.gather(*(batcher.submit(h, k) for h, k in requests))
        worker.cancel()
        return answers

    answers = asyncio.run(scenario())
    assert batcher.batches == 1 and batcher.requests == 4
    for (history, k), (ids, scores) in zip(requests, answers):
        alone_scores, alone = rec.recommend([history], k)
        assert ids == alone[0].tolist() and len(ids) == k
        assert scores == pytest.approx(alone_scores[0].tolist(), abs=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_service(export_dir: str, *options: str):
    """`fmrl serve` of ``export_dir``: a real uvicorn process on 127.0.0.1; yields its URL, then stops it."""
    import time

    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "trainer.cli", "serve", export_dir, *options, "--port", str(port)]
    process = subprocess.Popen(command + ["--threads", "1"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).json() == {"status": "ok"}:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not answer /health"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def service(export_dir):
    """The service of the size-16 model."""
    yield from _start_service(export_dir, "--size", "16")


def test_the_service_answers_recommend_health_and_info(service, export_dir) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    info = httpx.get(f"{service}/info").json()
    assert info["size"] == 16 and info["num_items"] == NUM_ITEMS and info["sizes"] == SIZES
    rec = load_recommender(export_dir, 16)
    history = ["item-5", "item-17", "item-42"]
    answer = httpx.post(f"{service}/recommend", json={"history": history, "k": 7}).json()
    _, expected = rec.recommend([[5, 17, 42]], k=7)
    assert answer["ids"] == expected[0].tolist()
    assert answer["items"] == [f"item-{i}" for i in answer["ids"]] and not set(answer["items"]) & set(history)
    # concurrent clients each get their own answer
    histories = [[f"item-{i}", f"item-{i + 1}"] for i in range(1, 25)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda h: httpx.post(f"{service}/recommend", json={"history": h, "k": 3}), histories)
        )
    for h, response in zip(histories, answers):
        ids = [int(x.removeprefix("item-")) for x in h]
        assert response.json()["ids"] == rec.recommend([ids], 3)[1][0].tolist()
    # an empty history gets the most popular items (popularity grows with the id here)
    popular = httpx.post(f"{service}/recommend", json={"history": [], "k": 2}).json()
    assert popular["ids"] == [NUM_ITEMS, NUM_ITEMS - 1]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"history": ["item-5", "no-such-item"], "k": 3}, "unknown item ids ['no-such-item']"),
        ({"history": ["item-5"], "k": 0}, "greater than or equal to 1"),
        ({"history": ["item-5"], "k": NUM_ITEMS + 1}, f"the catalog has {NUM_ITEMS} items"),
        ({"history": "item-5"}, "valid array"),
        ({"k": 3}, "Field required"),
        ({"history": [["item-5"]]}, "history"),
        # the last 200 items are used (an export without max_len): they leave 100 items
        (
            {"history": [f"item-{i}" for i in range(1, NUM_ITEMS + 1)], "k": 101},
            "a history covers all but 100",
        ),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(service, body, message) -> None:
    import httpx

    response = httpx.post(f"{service}/recommend", json=body)
    assert response.status_code == 422, response.text
    assert message in response.text


def test_a_body_that_is_not_json_gets_a_4xx(service) -> None:
    import httpx

    response = httpx.post(
        f"{service}/recommend", content=b"{history: [", headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500 and "JSON" in response.text


PORTABLE_ONLY = """
import sys, json, torch
program = torch.export.load(sys.argv[1]).module()
scores = program(torch.tensor([[0, 0, 5, 17, 42], [1, 2, 3, 4, 5]]))
print(json.dumps({"scores": scores.tolist(), "project": sorted(m for m in sys.modules if m.split(".")[0] in
      ("models", "deploy", "trainer"))}))
"""


def test_portable_programs_score_like_the_eager_export_on_local_disk_and_s3(
    trained, s3_server, tmp_path
) -> None:
    from data_pipeline.storage import filesystem, s3_filesystem_kwargs
    from deploy.portable import load_program

    local = str(tmp_path / "portable")
    remote = s3_server.make_bucket() + "/exports/demo"
    # written to S3 (tracing is slow: once); the local copy checks loading from a path
    export_model(trained, remote, [8], s3_server.options, formats=["pt2", "onnx"])
    storage = s3_filesystem_kwargs(s3_server.options)
    fs, path = filesystem(remote, s3_server.options)
    fs.get(path, local, recursive=True)
    manifest = json.loads(open(f"{local}/export.json").read())
    assert {"model.pt2", "model.onnx"} <= set(manifest["sizes"]["8"]["sha256"])
    eager = load_recommender(local, 8)
    from_s3 = load_recommender(remote, 8, storage_options=storage)
    for shape in [(1, 1), (5, 13), (3, 4)]:  # other batch sizes and history lengths than the traced one
        tokens = histories(*shape)
        expected = eager.scores(tokens)
        torch.testing.assert_close(from_s3.scores(tokens), expected, rtol=0, atol=0)
        for url, options in ((local, None), (remote, storage)):
            for fmt in ("pt2", "onnx"):
                scores = load_program(url, 8, fmt, options)(tokens)
                torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # torch alone loads and runs the program: no project module is imported
    out = subprocess.run(
        [sys.executable, "-c", PORTABLE_ONLY, f"{local}/size-8/model.pt2"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
    ).stdout
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["project"] == []
    expected = eager.scores(torch.tensor([[0, 0, 5, 17, 42], [1, 2, 3, 4, 5]]))
    torch.testing.assert_close(torch.tensor(answer["scores"]), expected, rtol=1e-5, atol=1e-5)


def test_the_service_funnels_and_quantises_when_asked(export_dir) -> None:
    import httpx

    options = ("--size", "32", "--quantised", "--funnel-prefix", "8", "--funnel-candidates", "40")
    for url in _start_service(export_dir, *options):
        info = httpx.get(f"{url}/info").json()
        assert info["funnel"] == {"prefix": 8, "candidates": 40, "ann": False} and info["quantised"]
        rec = load_recommender(export_dir, 32, quantised=True, funnel=Funnel(prefix=8, candidates=40))
        for history in ([5, 17, 42], [9], [1, 2, 3, 4, 5, 6, 7, 8]):
            body = {"history": [f"item-{i}" for i in history], "k": 10}
            answer = httpx.post(f"{url}/recommend", json=body).json()
            assert answer["ids"] == rec.recommend([history], 10)[1][0].tolist()
