"""The embedded SQLite store: persistence across reopen, WAL, schema version."""
import threading

from msmartcompute.runtime.store import MIGRATIONS, Store


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
