"""Training and evaluation batches from user shards: the leave-one-out split, exact resume with worker
processes, equal steps on every rank, and clear errors for bad records."""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.loader import DatasetError, SequenceDataset, TrainLoader, eval_batches, scan_users
from data_pipeline.sequences import left_pad
from data_pipeline.shards import ShardWriter
from data_pipeline.storage import join

NUM_ITEMS = 400
NUM_USERS = 90


def _sequence(user: int) -> list[int]:
    """3..14 distinct-looking ids per user; lengths vary so batches pad differently."""
    length = 3 + (user * 7) % 12
    return [1 + (user * 13 + 5 * i) % NUM_ITEMS for i in range(length)]


def write_dataset(base: str, users: dict[str, dict] | None = None, shard_size: int = 10) -> str:
    """Users shards (and dataset.json) as `fmrl data` writes them; ``users`` overrides records by key."""
    records = {f"{u:09d}": {"user_id": f"u{u}", "items": _sequence(u)} for u in range(NUM_USERS)}
    records.update(users or {})
    with ShardWriter(base, "users", shard_size) as w:
        for key, record in records.items():
            w.write(key, {"json": json.dumps(record).encode()})
    info = {"name": "t", "num_items": NUM_ITEMS, "num_users": len(records), "users_prefix": "users"}
    with open(join(base, "dataset.json"), "w") as f:
        json.dump(info, f)
    return base


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SequenceDataset:
    return SequenceDataset.open(write_dataset(str(tmp_path_factory.mktemp("users"))))


def make_loader(dataset: SequenceDataset, **kwargs) -> TrainLoader:
    args = dict(batch_size=8, max_len=6, seed=5, num_workers=0, prefetch_factor=2)
    return TrainLoader(dataset, scan_users(dataset), **{**args, **kwargs})


def run_keys(loader: TrainLoader, epochs: int, stop_after: int | None = None) -> list[tuple[str, ...]]:
    """Batch keys until ``epochs`` are done, or until ``stop_after`` batches (then abandon mid-epoch)."""
    out: list[tuple[str, ...]] = []
    while loader.epoch < epochs:
        for batch in loader:
            out.append(batch.keys)
            if len(out) == stop_after:
                return out
    return out


def test_training_batches_are_the_train_parts_of_every_user_once_per_epoch(dataset) -> None:
    loader = make_loader(dataset)
    for epoch in range(2):
        keys = []
        for batch in loader:
            assert len(batch.keys) == batch.tokens.shape[0] <= 8
            for key, tokens, labels in zip(batch.keys, batch.tokens, batch.labels):
                train = _sequence(int(key))[:-2]  # leave-one-out: the last two items are held out
                expected = left_pad([np.array(train[:-1]), np.array(train[1:])], 6)
                real = min(len(train) - 1, 6)
                assert tokens[-real:].tolist() == expected[0, -real:].tolist()
                assert labels[-real:].tolist() == expected[1, -real:].tolist()
                assert (tokens[:-real] == 0).all() and (labels[:-real] == 0).all()
            keys += batch.keys
        trainable = [f"{u:09d}" for u in range(NUM_USERS) if len(_sequence(u)) - 2 >= 2]
        assert sorted(keys) == trainable, epoch  # users whose train part has no target are skipped
        assert loader.epoch == epoch + 1


def test_shuffling_differs_per_epoch_and_per_seed(dataset) -> None:
    a = run_keys(make_loader(dataset), 2)
    assert a == run_keys(make_loader(dataset), 2)
    assert a != run_keys(make_loader(dataset, seed=6), 2)
    per_epoch = len(a) // 2
    assert a[:per_epoch] != a[per_epoch:]


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_resume_anywhere_gives_exactly_the_uninterrupted_batches(dataset, num_workers) -> None:
    full = run_keys(make_loader(dataset, num_workers=num_workers), 2)
    steps = len(full) // 2
    for cut in (1, 2, 5, steps - 1, steps, steps + 1, 2 * steps - 1):
        first = make_loader(dataset, num_workers=num_workers)
        head = run_keys(first, 2, stop_after=cut)
        state = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint stores it
        resumed = make_loader(dataset, num_workers=num_workers)
        resumed.load_state_dict(state)
        assert head + run_keys(resumed, 2) == full, cut


def test_worker_processes_prefetch_the_same_batches_as_one_process(dataset) -> None:
    # the order depends on the worker count, the content of an epoch does not
    one = run_keys(make_loader(dataset, num_workers=0), 1)
    two = run_keys(make_loader(dataset, num_workers=2), 1)
    assert sorted(k for b in one for k in b) == sorted(k for b in two for k in b)


def test_a_state_from_another_worker_count_is_refused(dataset) -> None:
    first = make_loader(dataset, num_workers=2)
    run_keys(first, 1, stop_after=3)
    with pytest.raises(ValueError, match=r"num_workers=2 \(now 1\)"):
        make_loader(dataset, num_workers=1).load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    ("saved", "resumed"),
    [((2, 0), (1, 0)), ((1, 0), (3, 0)), ((2, 2), (3, 1)), ((1, 2), (1, 1))],
    ids=["2to1", "1to3", "2x2to3x1", "workers2to1"],
)
def test_resume_in_another_layout_reads_the_rest_of_the_epoch_once(dataset, saved, resumed) -> None:
    """(world size, workers) of the job that saved and of the one that resumes."""
    trainable = {f"{u:09d}" for u in range(NUM_USERS) if len(_sequence(u)) - 2 >= 2}
    old = [make_loader(dataset, rank=r, world_size=saved[0], num_workers=saved[1]) for r in range(saved[0])]
    half = old[0].steps_in_epoch(0) // 2
    read = [k for loader in old for batch in run_keys(loader, 1, stop_after=half) for k in batch]
    states = json.loads(json.dumps([loader.state_dict() for loader in old]))  # as a checkpoint holds them
    new = [
        make_loader(dataset, rank=r, world_size=resumed[0], num_workers=resumed[1]) for r in range(resumed[0])
    ]
    assert [loader.resume(states) for loader in new] == [False] * resumed[0]  # not the saving layout
    steps = {loader.steps_in_epoch(0) for loader in new}
    rest = []
    for loader in new:
        batches = list(loader)  # the rest of epoch 0
        assert {len(batches)} == steps  # every rank the same count
        rest += [k for b in batches for k in b.keys]
    assert len(set(read + rest)) == len(read) + len(rest)  # no sequence twice in the epoch
    assert set(read + rest) <= trainable
    # only the tail that equal step counts drop goes unread: less than a batch per reading slot
    assert len(trainable) - len(read) - len(rest) < 8 * resumed[0] * max(resumed[1], 1) + 8
    # the next epoch is an ordinary one of the new layout
    for loader in new:
        reference = make_loader(dataset, rank=loader.rank, world_size=resumed[0], num_workers=resumed[1])
        run_keys(reference, 1)
        assert loader.epoch == reference.epoch == 1
        assert run_keys(loader, 2) == run_keys(reference, 2)


def test_layout_changes_chain_within_one_epoch(dataset) -> None:
    # 2 ranks read a little, 1 rank takes over and reads some more, then 3 ranks finish the epoch
    read = []
    states = None
    for world, batches in ((2, 2), (1, 3), (3, None)):
        loaders = [make_loader(dataset, rank=r, world_size=world) for r in range(world)]
        if states is not None:
            assert not any([loader.resume(states) for loader in loaders])
        for loader in loaders:
            read += [k for b in run_keys(loader, 1, stop_after=batches) for k in b]
        states = json.loads(json.dumps([loader.state_dict() for loader in loaders]))
    assert len(set(read)) == len(read) > 50


def test_a_resume_in_the_saving_layout_is_exact(dataset) -> None:
    first = make_loader(dataset, num_workers=2)
    head = run_keys(first, 2, stop_after=3)
    resumed = make_loader(dataset, num_workers=2)
    assert resumed.resume(json.loads(json.dumps([first.state_dict()])))
    assert head + run_keys(resumed, 2) == run_keys(make_loader(dataset, num_workers=2), 2)


def test_every_rank_takes_the_same_number_of_steps(dataset) -> None:
    stats = scan_users(dataset)
    loaders = [make_loader(dataset, rank=r, world_size=3, num_workers=2) for r in range(3)]
    for epoch in range(2):
        # what each rank's slots hold this epoch, from the per-shard counts of the start-up scan
        layout = loaders[0].stream(0)
        own = [
            sum(
                -(-int(stats.trainable_per_shard[layout.slot_shards(epoch, s)].sum()) // 8)
                for s in (2 * r, 2 * r + 1)
            )
            for r in range(3)
        ]
        assert len(set(own)) > 1 or epoch == 1  # uneven shards: the ranks hold different batch counts
        steps = [loader.steps_in_epoch(epoch) for loader in loaders]
        assert steps == [min(own)] * 3  # computed by every rank alone, no communication
        keys = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == min(own)  # the rest of the epoch is dropped, as drop_last would
            keys.append({k for b in batches for k in b.keys})
        assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_eval_batches_hold_out_the_last_two_items(dataset) -> None:
    for split, cut in (("valid", 2), ("test", 1)):
        batches = list(eval_batches(dataset, split, batch_size=16, max_len=4))
        targets = torch.cat([b.targets for b in batches]).tolist()
        assert targets == [_sequence(u)[-cut] for u in range(NUM_USERS)]
        rows = [row for b in batches for row in b.tokens.tolist()]
        for u, row in enumerate(rows):
            history = _sequence(u)[:-cut][-4:]
            assert row[-len(history) :] == history and all(t == 0 for t in row[: -len(history)])
    few = list(eval_batches(dataset, "valid", batch_size=16, max_len=4, max_users=20))
    assert sum(len(b.targets) for b in few) == 20
    halves = [
        torch.cat([b.targets for b in eval_batches(dataset, "test", 16, 4, rank=r, world_size=2)])
        for r in range(2)
    ]
    assert sorted(torch.cat(halves).tolist()) == sorted(_sequence(u)[-1] for u in range(NUM_USERS))


def test_user_stats_count_train_items_only(dataset) -> None:
    stats = scan_users(dataset)
    expected = np.zeros(NUM_ITEMS + 1, dtype=np.int64)
    for u in range(NUM_USERS):
        np.add.at(expected, _sequence(u)[:-2], 1)
    assert np.array_equal(stats.train_item_counts, expected)
    assert stats.trainable_per_shard.sum() == sum(len(_sequence(u)) >= 4 for u in range(NUM_USERS))


def _scan_worker(rank: int, port: int, bases: list[str], out_dir: str) -> None:
    """One of 2 gloo ranks: scan its copy of the data set (holding only its own user shards) and save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        stats = scan_users(SequenceDataset.open(bases[rank]), rank, 2)
        np.savez(
            os.path.join(out_dir, f"rank{rank}.npz"),
            trainable=stats.trainable_per_shard,
            counts=stats.train_item_counts,
        )
    finally:
        dist.destroy_process_group()


def test_ranks_scan_their_share_of_user_shards_and_get_the_one_rank_counts(dataset, tmp_path) -> None:
    shards = [entry.name for entry in dataset.users.shards]
    assert len(shards) == 9  # both ranks read some: 5 and 4
    bases = []
    for rank in range(2):  # each rank's copy lacks the other rank's shards: reading one would raise
        base = shutil.copytree(dataset.url, tmp_path / f"rank{rank}")
        for index, name in enumerate(shards):
            if index % 2 != rank:
                os.remove(base / name)
        bases.append(str(base))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_scan_worker, args=(port, bases, str(tmp_path)), nprocs=2, join=True)
    one_rank = scan_users(dataset)
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert got["trainable"].dtype == got["counts"].dtype == np.int64
        assert np.array_equal(got["trainable"], one_rank.trainable_per_shard)
        assert np.array_equal(got["counts"], one_rank.train_item_counts)
    with pytest.raises(ValueError, match="scan_users over 2 ranks .* is not initialised"):
        scan_users(dataset, 1, 2)  # without a group the counts would be one rank's share


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        (
            {"user_id": "x", "items": [1, 2, NUM_ITEMS + 1]},
            rf"item id {NUM_ITEMS + 1} is outside 1\.\.{NUM_ITEMS}",
        ),
        ({"user_id": "x", "items": [1, 2]}, r"at least 3 items, got \[1, 2\]"),
        ({"user_id": "x"}, r"missing field 'items'"),
        ({"user_id": "x", "items": "abc"}, r"'items' list of ids"),
    ],
)
def test_a_bad_user_record_names_the_shard_and_key(tmp_path, record, pattern) -> None:
    base = write_dataset(str(tmp_path), users={"000000042": record})
    with pytest.raises(DatasetError, match=rf"users-000004\.tar record .000000042.: .*{pattern}"):
        scan_users(SequenceDataset.open(base))


def test_an_incomplete_dataset_is_refused(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"dataset\.json does not exist.*not a complete dataset"):
        SequenceDataset.open(str(tmp_path))
