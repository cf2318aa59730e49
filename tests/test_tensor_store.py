from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sd_core.store.tensors import TensorStore, canonical_key, entry_id


def key(i: int, resolution: int = 64) -> dict:
    return {"kind": "latent", "md5": f"{i:032x}", "resolution": resolution, "revision": None, "scale": 0.18215}


def tensors(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"mean": torch.randn(4, 8, 8, generator=g), "mask": torch.arange(5) + i}


def shard_files(store: TensorStore) -> list[str]:
    return sorted(p.name for p in store.shards_dir.glob("shard-*.safetensors"))


def test_put_get_round_trip(tmp_path):
    store = TensorStore(tmp_path, shard_size=4)
    store.put([(key(i), tensors(i)) for i in range(10)])
    assert store.stats()["entries"] == 10 and store.stats()["shards"] == 3
    for i in range(10):
        got = store.get(key(i))
        assert got is not None and set(got) == {"mean", "mask"}
        torch.testing.assert_close(got["mean"], tensors(i)["mean"])
        assert torch.equal(got["mask"], tensors(i)["mask"])
        assert store.contains(key(i))
    reopened = TensorStore(tmp_path, shard_size=4)
    torch.testing.assert_close(reopened.get(key(3))["mean"], tensors(3)["mean"])
    assert store.stats()["bytes"] > 10 * 4 * 8 * 8 * 4


def test_views_of_one_batch_are_stored_independently(tmp_path):
    store = TensorStore(tmp_path)
    batch = torch.randn(3, 4, 2, 2)
    store.put([(key(i), {"mean": batch[i]}) for i in range(3)])
    for i in range(3):
        assert torch.equal(store.get(key(i))["mean"], batch[i])


def test_other_key_is_a_miss(tmp_path):
    store = TensorStore(tmp_path)
    store.put([(key(1), tensors(1))])
    assert store.get(key(1, resolution=32)) is None
    assert not store.contains(key(2))
    assert store.get({**key(1), "revision": "abc"}) is None


def test_key_verified_against_shard_metadata(tmp_path):
    store = TensorStore(tmp_path)
    store.put([(key(1), tensors(1)), (key(2), tensors(2))])
    index = json.loads(store.index_path.read_text())
    # a stale index entry that points at a shard holding some other key: answered None, not wrong tensors
    stale = {"kind": "latent", "md5": "other"}
    index["entries"][entry_id(stale)] = index["entries"][entry_id(key(1))]
    store.index_path.write_text(json.dumps(index))
    reopened = TensorStore(tmp_path)
    assert reopened.get(stale) is None
    assert reopened.get(key(1)) is not None


def test_shards_never_rewritten(tmp_path):
    store = TensorStore(tmp_path, shard_size=2)
    store.put([(key(i), tensors(i)) for i in range(4)])
    before = {n: ((store.shards_dir / n).stat().st_mtime_ns, (store.shards_dir / n).read_bytes()) for n in shard_files(store)}
    store.put([(key(i), tensors(i)) for i in range(4, 7)])
    store.put([(key(0), {"mean": torch.zeros(4, 8, 8)})])  # overwrite of an existing key lands in a new shard
    for name, (mtime, data) in before.items():
        assert (store.shards_dir / name).stat().st_mtime_ns == mtime
        assert (store.shards_dir / name).read_bytes() == data
    assert len(shard_files(store)) == 5
    assert torch.equal(store.get(key(0))["mean"], torch.zeros(4, 8, 8))
    assert set(store.get(key(0))) == {"mean"}


def test_shard_metadata_holds_full_keys(tmp_path):
    store = TensorStore(tmp_path)
    store.put([(key(i), tensors(i)) for i in range(3)])
    (name,) = shard_files(store)
    with safe_open(store.shards_dir / name, framework="pt") as f:
        meta = f.metadata()
    for i in range(3):
        assert json.loads(meta[entry_id(key(i))]) == key(i)
        assert meta[entry_id(key(i))] == canonical_key(key(i))


def test_rebuild_index_after_deletion(tmp_path):
    store = TensorStore(tmp_path, shard_size=3)
    store.put([(key(i), tensors(i)) for i in range(5)])
    store.put([(key(2), {"mean": torch.ones(1)})])
    store.index_path.unlink()
    reopened = TensorStore(tmp_path, shard_size=3)
    assert reopened.stats()["entries"] == 5
    assert torch.equal(reopened.get(key(2))["mean"], torch.ones(1)), "the later shard wins"
    assert reopened.get(key(4)) is not None
    reopened.index_path.write_text("{not json")
    assert TensorStore(tmp_path).rebuild_index() == 5
    assert TensorStore(tmp_path).get(key(0)) is not None


def test_fake_crash_is_recovered(tmp_path):
    store = TensorStore(tmp_path, shard_size=4)
    store.put([(key(i), tensors(i)) for i in range(4)])
    index_before = store.index_path.read_text()
    store.put([(key(i), tensors(i)) for i in range(4, 8)])
    # killed between the shard and the index: the old index, and a half shard of a third batch
    store.index_path.write_text(index_before)
    half = store.shards_dir / ".shard.1234abcd.tmp"
    half.write_bytes(b"\x00" * 100)
    reopened = TensorStore(tmp_path, shard_size=4)
    assert not half.exists()
    assert all(reopened.get(key(i)) is not None for i in range(8))
    assert len(json.loads(reopened.index_path.read_text())["entries"]) == 8
    reopened.put([(key(9), tensors(9))])
    assert shard_files(reopened)[-1] == "shard-000003.safetensors"


def test_damaged_shard_is_a_miss(tmp_path):
    store = TensorStore(tmp_path, shard_size=2)
    store.put([(key(i), tensors(i)) for i in range(4)])
    (store.shards_dir / shard_files(store)[0]).write_bytes(b"garbage")
    reopened = TensorStore(tmp_path, shard_size=2)
    assert reopened.get(key(0)) is None
    assert reopened.get(key(3)) is not None


def test_put_rejects_bad_names_and_values(tmp_path):
    store = TensorStore(tmp_path)
    with pytest.raises(ValueError):
        store.put([(key(1), {"a/b": torch.zeros(1)})])
    with pytest.raises(TypeError):
        store.put([({"x": [1, 2]}, {"a": torch.zeros(1)})])
    store.put([])
    assert store.stats()["shards"] == 0


def test_two_writers_side_by_side(tmp_path):
    a = TensorStore(tmp_path, shard_size=2, sweep=False)
    b = TensorStore(tmp_path, shard_size=2, sweep=False)
    a.put([(key(i), tensors(i)) for i in range(3)])
    b.put([(key(i), tensors(i)) for i in range(3, 6)])  # b's index never saw a's shards
    leftover = a.shards_dir / ".shard.0123abcd.tmp"
    leftover.write_bytes(b"partial")
    TensorStore(tmp_path, sweep=False)
    assert leftover.exists(), "sweep=False leaves other writers' temp files alone"
    merged = TensorStore(tmp_path)
    assert not leftover.exists()
    assert len(shard_files(merged)) == 4 and merged.stats()["entries"] == 6
    assert all(merged.get(key(i)) is not None for i in range(6))


def test_same_size_overwrite_is_caught_and_moved_aside(tmp_path, caplog):
    """Bit rot that keeps the file size and the header readable: the data no longer matches its checksums."""
    store = TensorStore(tmp_path, shard_size=4)
    store.put([(key(i), {"x": torch.full((64, 64), float(i))}) for i in range(8)])  # two shards of 4 entries
    first = tmp_path / "shards" / shard_files(store)[0]
    data = bytearray(first.read_bytes())
    data[-4096:] = b"\xff" * 4096  # NaN-ish garbage over the end of the tensor data, same size
    first.write_bytes(bytes(data))
    reopened = TensorStore(tmp_path, shard_size=4)
    with caplog.at_level("WARNING"):
        assert reopened.get(key(3)) is None and not reopened.contains(key(0))
    assert reopened.get(key(5)) is not None  # the other shard is intact
    assert (tmp_path / "damaged" / first.name).exists() and not first.exists()
    assert any("is damaged (entry" in r.message and first.name in r.message for r in caplog.records)
    assert reopened.missing([key(i) for i in range(8)]) == [0, 1, 2, 3]
    reopened.put([(key(i), {"x": torch.full((64, 64), float(i))}) for i in range(4)])  # recomputed
    assert torch.equal(TensorStore(tmp_path).get(key(2))["x"], torch.full((64, 64), 2.0))


def test_shards_without_checksums_are_recomputed(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "shards").mkdir()
    eid = entry_id(key(0))
    save_file({f"{eid}/x": torch.ones(2)}, str(tmp_path / "shards" / "shard-000001.safetensors"),
              metadata={"format": "pt", eid: canonical_key(key(0))})
    store = TensorStore(tmp_path)
    assert store.get(key(0)) is None and (tmp_path / "damaged" / "shard-000001.safetensors").exists()
