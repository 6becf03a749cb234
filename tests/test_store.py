"""calib/store.py: files written on a background thread, read back as they were put, none begun after an error."""

import threading

import pytest
import torch
from safetensors.torch import load_file

import tlora_cli.calib.store as store_module
from tlora_cli.calib.store import TensorStore


@pytest.fixture
def held_writes(monkeypatch) -> threading.Event:
    """Writes wait for the event before they touch the disk: a test sees what happens while they are under way."""
    go = threading.Event()
    original = store_module.save_file

    def save_file(tensors, path):
        assert go.wait(30), "a write waited 30 s"
        original(tensors, path)

    monkeypatch.setattr(store_module, "save_file", save_file)
    return go


def test_put_returns_before_the_file_is_written_and_a_read_waits_for_it(held_writes, tmp_path):
    store = TensorStore(tmp_path, "covariance", copy=True)
    source = torch.randn(64, 64)
    expected = source.clone()
    store.put("a", source)
    source.zero_()  # the caller goes on using its tensor: the file must hold it as it was when put
    assert not store.path("a").exists()
    threading.Timer(0.2, held_writes.set).start()
    assert torch.equal(store.get("a"), expected)
    assert torch.equal(load_file(store.path("a"))["covariance"], expected)
    store.close()


def test_put_waits_once_too_many_bytes_are_unwritten(held_writes, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "WRITE_AHEAD_BYTES", 3000)
    store = TensorStore(tmp_path)
    store.put("a", torch.ones(500))  # 2000 bytes on their way
    second = threading.Thread(target=store.put, args=("b", torch.ones(500)))  # 4000 > 3000: waits for "a"
    second.start()
    second.join(0.5)
    assert second.is_alive() and "b" not in store.writing
    held_writes.set()
    second.join(30)
    assert not second.is_alive()
    store.put("c", torch.ones(2000))  # bigger than the limit alone: written once nothing else is pending
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert torch.equal(store.get("c"), torch.ones(2000))


def test_a_failed_write_is_raised_to_the_caller_and_stops_the_writer(tmp_path, monkeypatch):
    """The error reaches the command as if the write had been done in place (cli.py names a full disk)."""

    def full(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", full)
    store = TensorStore(tmp_path)
    store.put("a", torch.ones(3))
    with pytest.raises(OSError, match="No space left on device"):
        store.close()
    assert store.writer is None


def test_after_an_error_no_file_appears_once_the_store_is_left(held_writes, tmp_path):
    """The write under way finishes (it cannot be stopped), the queued ones never start: the folder can go."""
    threading.Timer(0.3, held_writes.set).start()
    with pytest.raises(KeyboardInterrupt), TensorStore(tmp_path) as store:
        for key in "abc":
            store.put(key, torch.ones(4))
        raise KeyboardInterrupt
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written in ([], ["a.safetensors"])
    assert store.writer is None and not store.writing
    held_writes.set()
    assert sorted(p.name for p in tmp_path.iterdir()) == written


def test_a_dropped_key_leaves_no_file_even_while_it_was_being_written(held_writes, tmp_path):
    store = TensorStore(tmp_path)
    store.put("a", torch.ones(4))
    store.put("b", torch.ones(4))  # queued behind "a": cancelled
    threading.Timer(0.2, held_writes.set).start()
    store.drop("a")  # under way: waited for, then removed
    store.drop("b")
    store.close()
    assert list(tmp_path.iterdir()) == [] and len(store) == 0


def test_every_statistic_store_is_closed_when_one_write_failed(tmp_path, monkeypatch):
    from tlora_cli.calib.statistics import StatisticStores

    def full_in_a(tensors, path):
        if path.parent.name == "a":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", full_in_a)
    stores = StatisticStores({kind: TensorStore(tmp_path / kind) for kind in "abc"})
    with pytest.raises(OSError, match="No space left"), stores:
        for store in stores.values():
            store.put("x", torch.ones(4))
    assert [store.writer for store in stores.values()] == [None, None, None]


@pytest.mark.cuda
def test_a_file_from_the_gpu_holds_the_tensor_as_it_was_when_put(tmp_path):
    """The copy to pinned memory is queued behind the device's work; the writer waits for it, not `put`."""
    store = TensorStore(tmp_path, "covariance")
    on_device = torch.randn(4096, 4096, device="cuda")
    expected = on_device.cpu()
    torch.cuda._sleep(10**9)  # keeps the stream busy: the copy is still queued when put returns
    store.put("c", on_device)
    on_device.zero_()  # queued behind the copy
    store.close()
    assert torch.equal(load_file(store.path("c"))["covariance"], expected)
