"""The embedded SQLite store: persistence across reopen, WAL, schema version, refusal of a
damaged file, owner-only files, online backup and restore."""
import stat
import threading

import pytest

from msmartcompute.runtime.store import MIGRATIONS, Store, StoreDamaged, restore


def test_put_get_delete_survive_reopen(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    store.put("models", "m1", {"model_type": "mlp", "n": 3})
    store.put("models", "m2", [1, 2])
    store.put("models", "m1", {"model_type": "mlp", "n": 4})  # upsert
    store.close()
    store = Store(tmp_path / "s.sqlite3")
    assert store.get("models", "m1") == {"model_type": "mlp", "n": 4}
    assert [k for k, _ in store.items("models")] == ["m1", "m2"]
    assert store.delete("models", "m2") and not store.delete("models", "m2")
    assert store.get("models", "m2", "absent") == "absent"
    assert store.schema_version == len(MIGRATIONS)
    assert store.connect().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_threads_write_concurrently(tmp_path):
    store = Store(tmp_path / "s.sqlite3")

    def writer(n):
        for i in range(50):
            store.put("t", f"{n}-{i}", i)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.items("t")) == 200


def _filled_store(path):
    store = Store(path)
    for i in range(400):
        store.put("t", f"k{i:04d}", "x" * 200)
    store.close()  # the last connection checkpoints: every page is in the main file
    return path


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = b""
    elif how == "half":
        data = data[: len(data) // 2]
    elif how == "header":
        data[:100] = bytes(100)
    elif how == "page":  # one 4 KiB page in the middle overwritten
        page = 4096 * (len(data) // 4096 // 2)
        data[page:page + 4096] = bytes((i * 37) % 251 for i in range(4096))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["empty", "half", "header", "page"])
def test_a_damaged_store_is_refused_and_left_as_it_is(tmp_path, how):
    path = _filled_store(tmp_path / "s.sqlite3")
    _damage(path, how)
    before = path.read_bytes()
    with pytest.raises(StoreDamaged, match="msmartcompute store restore"):
        Store(path)
    assert path.read_bytes() == before


def test_store_files_are_owner_only(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    store.put("t", "k", 1)
    for f in tmp_path.glob("s.sqlite3*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    store.close()


def test_backup_while_written_then_restore_over_a_damaged_store(tmp_path):
    path = _filled_store(tmp_path / "s.sqlite3")
    live = Store(path)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            live.put("w", str(i), i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        live.backup(tmp_path / "b.sqlite3")
    finally:
        stop.set()
        t.join()
    with pytest.raises(FileExistsError):
        live.backup(tmp_path / "b.sqlite3")
    live.close()
    assert stat.S_IMODE((tmp_path / "b.sqlite3").stat().st_mode) == 0o600
    _damage(path, "page")
    kept = restore(tmp_path / "b.sqlite3", path)
    assert kept is not None and kept.exists()
    restored = Store(path)
    assert len(restored.items("t")) == 400 and restored.get("t", "k0000") == "x" * 200
    restored.close()
    _damage(tmp_path / "b.sqlite3", "header")
    with pytest.raises(StoreDamaged):  # a damaged backup never replaces anything
        restore(tmp_path / "b.sqlite3", path)
    assert Store(path).get("t", "k0399") == "x" * 200
