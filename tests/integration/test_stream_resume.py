"""Streaming a shard set with an exact resumable position: coverage per epoch, seeded order, resume at
any sample (the resumed key log equals an uninterrupted one), disjoint rank/worker slots, refusal of a
state from another world size, corrupt shards, and the same resume against a real S3 server (moto).

    .venv/bin/python -m pytest -q tests/integration/test_stream_resume.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipeline.shards import CorruptShardError, ShardWriter, read_manifest
from data_pipeline.storage import StorageError, join
from data_pipeline.stream import ShardStream

N_SAMPLES = 57
EPOCHS = 3


def _seq(i: int) -> np.ndarray:
    return np.arange(1, 3 + i % 9, dtype=np.int64) + i  # 2..10 items: every sequence has a target


def _write(base: str, options=None) -> list[str]:
    keys = [f"u{i:05d}" for i in range(N_SAMPLES)]
    with ShardWriter(base, "train", 10, options=options) as w:
        for i, key in enumerate(keys):
            w.write(key, {"seq.npy": _seq(i).astype("<i8").tobytes()})
    return keys


@pytest.fixture
def shard_dir(tmp_path) -> str:
    base = str(tmp_path)
    _write(base)
    return base


def _consume(stream: ShardStream, epochs: int, limit: int | None = None) -> list[str]:
    """Keys handed out until ``epochs`` are done or ``limit`` samples were taken (then stop mid-iteration)."""
    log: list[str] = []
    while stream.epoch < epochs:
        for sample in stream.iter_epoch():
            log.append(sample["__key__"])
            if len(log) == limit:
                return log
    return log


def test_every_epoch_covers_all_samples_in_a_seeded_order(shard_dir) -> None:
    log = _consume(ShardStream(shard_dir, "train", seed=3), EPOCHS)
    again = _consume(ShardStream(shard_dir, "train", seed=3), EPOCHS)
    other_seed = _consume(ShardStream(shard_dir, "train", seed=4), EPOCHS)
    epochs = [log[e * N_SAMPLES : (e + 1) * N_SAMPLES] for e in range(EPOCHS)]
    expected = sorted(f"u{i:05d}" for i in range(N_SAMPLES))
    assert len(log) == EPOCHS * N_SAMPLES
    for keys in epochs:
        assert sorted(keys) == expected
    assert len({tuple(keys) for keys in epochs}) == EPOCHS  # the shard order changes every epoch
    assert again == log
    assert other_seed != log


def test_without_shuffle_the_order_is_the_file_order(shard_dir) -> None:
    log = _consume(ShardStream(shard_dir, "train", shuffle=False), 1)
    assert log == [f"u{i:05d}" for i in range(N_SAMPLES)]


def _resume_positions(base: str) -> list[int]:
    """Stop points inside epoch 1 (the second of three): its start, the end of its first shard, the middle,
    and right after its last sample."""
    stream = ShardStream(base, "train", seed=7)
    first = stream.manifest.shards[stream.slot_shards(1)[0]].samples
    return [N_SAMPLES + k for k in (0, first, 23, N_SAMPLES)]


def test_resume_from_any_sample_continues_exactly(shard_dir) -> None:
    full = _consume(ShardStream(shard_dir, "train", seed=7), EPOCHS)
    for stop in [*_resume_positions(shard_dir), 1, N_SAMPLES - 1]:
        first = ShardStream(shard_dir, "train", seed=7)
        head = _consume(first, EPOCHS, limit=stop)
        state = json.loads(json.dumps(first.state_dict()))  # plain data: survives any checkpoint format
        resumed = ShardStream(shard_dir, "train", seed=7)
        resumed.load_state_dict(state)
        assert head + _consume(resumed, EPOCHS) == full, f"stopped after {stop} samples"


def test_resume_after_a_completed_epoch(shard_dir) -> None:
    full = _consume(ShardStream(shard_dir, "train", seed=7), EPOCHS)
    first = ShardStream(shard_dir, "train", seed=7)
    head = _consume(first, 1)
    assert first.state_dict()["epoch"] == 1
    resumed = ShardStream(shard_dir, "train", seed=7)
    resumed.load_state_dict(first.state_dict())
    assert head + _consume(resumed, EPOCHS) == full


def test_rank_worker_slots_are_disjoint_and_cover_the_epoch(shard_dir) -> None:
    logs = {}
    for rank in range(2):
        for worker in range(2):
            stream = ShardStream(shard_dir, "train", rank=rank, world_size=2, num_workers=2, worker_id=worker)
            logs[rank, worker] = _consume(stream, 1)
    assert all(logs.values())
    everything = [key for log in logs.values() for key in log]
    assert len(everything) == len(set(everything)) == N_SAMPLES


def test_fewer_shards_than_slots_is_refused(shard_dir) -> None:
    with pytest.raises(ValueError, match=r"6 shards.*world_size=4 x num_workers=2 = 8 slots"):
        ShardStream(shard_dir, "train", rank=0, world_size=4, num_workers=2)


def test_a_state_from_another_world_size_is_refused(shard_dir) -> None:
    two = ShardStream(shard_dir, "train", rank=0, world_size=2)
    _consume(two, 1, limit=5)
    one = ShardStream(shard_dir, "train")
    with pytest.raises(ValueError, match=r"world_size=2 \(now 1\)"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match=r"num_workers=1 \(now 2\)"):
        ShardStream(shard_dir, "train", num_workers=2).load_state_dict(one.state_dict())


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        # each sample is one 1024-byte member here (header + padded payload); shard 2 holds u00020..u00029
        # inside a payload
        (
            3 * 1024 + 516,
            r"truncated or corrupt \(TarFormatError: the stream ends inside a member.*key: 'u00021'",
        ),
        (5 * 1024, r"short.*last good key: 'u00024'"),  # at a member boundary: reads as a shorter tar
        (10 * 1024, r"sha256.*last good key: 'u00029'"),  # only the end-of-archive blocks are missing
    ],
)
def test_a_truncated_shard_names_its_url(shard_dir, cut: int, why: str) -> None:
    entry = read_manifest(shard_dir, "train").shards[2]
    with open(os.path.join(shard_dir, entry.name), "r+b") as f:
        f.truncate(cut)
    with pytest.raises(CorruptShardError, match=rf"{join(shard_dir, entry.name)} .*{why}"):
        _consume(ShardStream(shard_dir, "train", shuffle=False), 1)


def test_a_flipped_byte_is_detected_while_streaming(shard_dir) -> None:
    entry = read_manifest(shard_dir, "train").shards[0]
    path = os.path.join(shard_dir, entry.name)
    data = bytearray(open(path, "rb").read())
    data[512 + 3] ^= 0xFF  # inside the first member's payload: the tar stays well-formed
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptShardError, match=rf"{entry.name}.*sha256"):
        _consume(ShardStream(shard_dir, "train", shuffle=False), 1)


def test_shuffled_samples_within_shards_resume_exactly(shard_dir) -> None:
    def stream() -> ShardStream:
        return ShardStream(shard_dir, "train", seed=3, shuffle_samples=True)

    full = _consume(stream(), EPOCHS)
    plain = _consume(ShardStream(shard_dir, "train", seed=3), EPOCHS)
    per_epoch = [full[e * N_SAMPLES : (e + 1) * N_SAMPLES] for e in range(EPOCHS)]
    assert all(sorted(epoch) == sorted(plain[:N_SAMPLES]) for epoch in per_epoch)
    assert full != plain and per_epoch[0] != per_epoch[1]  # shuffled within shards, anew each epoch
    for cut in (1, 9, 10, 31, N_SAMPLES, N_SAMPLES + 4, 2 * N_SAMPLES + 11):
        first = stream()
        head = _consume(first, EPOCHS, limit=cut)
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + _consume(resumed, EPOCHS) == full, cut
    with pytest.raises(ValueError, match="shuffle_samples=True"):
        ShardStream(shard_dir, "train", seed=3).load_state_dict(stream().state_dict())


def test_resume_on_s3(s3_server) -> None:
    base = join(s3_server.make_bucket(), "data")
    options = s3_server.options
    _write(base, options)
    full = _consume(ShardStream(base, "train", seed=1, options=options), 2)
    first = ShardStream(base, "train", seed=1, options=options)
    head = _consume(first, 2, limit=N_SAMPLES + 13)
    resumed = ShardStream(base, "train", seed=1, options=options)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + _consume(resumed, 2) == full


def test_s3_server_stopping_mid_epoch_is_a_clear_error_and_the_position_survives(s3_server) -> None:
    bucket = s3_server.make_bucket()
    base = join(bucket, "data")
    options = s3_server.options
    _write(base, options)
    full = _consume(ShardStream(base, "train", shuffle=False, options=options), 1)

    stream = ShardStream(base, "train", shuffle=False, options=options)
    received: list[str] = []
    samples = stream.iter_epoch()
    try:
        for sample in samples:
            received.append(sample["__key__"])
            if len(received) == 15:  # in the second shard
                s3_server.stop()
        raise AssertionError("reading on after the server stopped did not fail")
    except StorageError as error:
        message = str(error)
    finally:
        s3_server.start()
    # the error names what could not be read and where; never the secret
    assert "train-" in message and s3_server.endpoint_url in message and "testing" not in message
    # the shards already in flight were delivered whole; the position counts exactly what was received
    assert received == full[: len(received)] and len(received) >= 15
    state = stream.state_dict()
    assert (state["shard_index"], state["offset"]) in (
        (len(received) // 10, len(received) % 10),
        (len(received) // 10 - 1, 10),
    )

    # the restarted server is empty (moto keeps state in memory): put the data back and resume exactly
    s3_server.make_bucket(bucket.removeprefix("s3://"))
    _write(base, options)
    resumed = ShardStream(base, "train", shuffle=False, options=options)
    resumed.load_state_dict(state)
    assert received + _consume(resumed, 1) == full
