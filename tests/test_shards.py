"""ual/shards.py in one process: shards kept as they finish, a rerun computes only the missing ones, rows in
item order. Across real processes: tests/test_data_parallel.py."""

import pytest

from ual.shards import job_folder, map_shards


class Crash(Exception):
    pass


def test_a_rerun_computes_only_the_shards_not_on_disk(tmp_path):
    folder = job_folder(tmp_path, "score", ["fingerprint", 10, 3])
    computed = []

    def compute(items):
        computed.append((items.start, items.stop))
        if len(computed) == 3:
            raise Crash  # the process dies in its third shard
        return [{"item": i, "square": i * i} for i in items]

    with pytest.raises(Crash):
        map_shards(folder, 10, 3, compute)
    assert sorted(p.name for p in folder.glob("shard-*.jsonl")) == ["shard-000000.jsonl", "shard-000001.jsonl"]
    computed.clear()
    rows = map_shards(folder, 10, 3, compute)
    assert computed == [(6, 9), (9, 10)]  # shards 0 and 1 were read
    assert rows == [{"item": i, "square": i * i} for i in range(10)]


def test_other_inputs_or_settings_get_other_shards(tmp_path):
    assert job_folder(tmp_path, "score", ["a", 10, 3]) != job_folder(tmp_path, "score", ["b", 10, 3])
    assert job_folder(tmp_path, "score", ["a", 10, 3]) != job_folder(tmp_path, "score", ["a", 10, 4])
    assert job_folder(tmp_path, "score", ["a", 10, 3]) == job_folder(tmp_path, "score", ["a", 10, 3])


def test_a_shard_with_the_wrong_number_of_rows_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="shard 0 gave 1 rows for 3 items"):
        map_shards(tmp_path / "job", 3, 3, lambda items: [{}])
    assert not list((tmp_path / "job").glob("shard-*"))
