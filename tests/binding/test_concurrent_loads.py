"""Loads into one model from two threads: the second waits for the first, never joins its transaction.

Before, ``atomic()`` joined any open transaction on the same model whatever the thread: when the first
thread's load failed and rolled back, the second thread's adapter, whose ``load_adapter`` had already
returned, vanished with it; when the second one failed, its adapter stayed. Each test parks the first load
inside PEFT (in ``load_peft_weights``, after PEFT injected the adapter) until the second thread is seen
waiting for the model's lock, then lets it go: no timing is involved.
"""

from __future__ import annotations

import sys
import threading
import time

import peft.peft_model
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_buffers import IncompatibleAdapterWeights
from peft_buffers.core import active_transaction, atomic

X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def make_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def save_trained(folder, seed: int, target: str = "0") -> torch.Tensor:
    """An adapter trained one step (its statistics move), saved; what it computes after a reload."""
    model = get_peft_model(make_base(), LoraConfig(target_modules=[target], init_lora_weights=False))
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(torch.randn(16, 8) * seed).square().mean().backward()
    optimizer.step()
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        return PeftModel.from_pretrained(make_base(), folder).eval()(X)


def computes(model: PeftModel, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model.eval()(X)


def wrapped_adapters(model: nn.Module) -> set[str]:
    """Adapter names that own LoRA modules in the tree."""
    return {name for module in model.modules() for name in getattr(module, "lora_A", {})}


def waiting_for_the_model(thread: threading.Thread) -> bool:
    """``thread`` is blocked acquiring a model's lock (inside ``peft_buffers.core.exclusive``)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "exclusive" and frame.f_code.co_filename.endswith("_transaction.py"):
            return True
        frame = frame.f_back
    return False


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.001)  # polling a condition; the order of events is fixed by it, not by the delay


class ParkedLoad:
    """Makes the load of ``model_id`` stop inside PEFT (after the adapter is injected) until :meth:`go`."""

    def __init__(self, monkeypatch, model_id, fail: bool):
        self.model_id, self.fail = str(model_id), fail
        self.inside, self.release = threading.Event(), threading.Event()
        self.real = peft.peft_model.load_peft_weights
        monkeypatch.setattr(peft.peft_model, "load_peft_weights", self)

    def __call__(self, model_id, *args, **kwargs):
        if str(model_id) == self.model_id:
            self.inside.set()
            assert self.release.wait(60)
            if self.fail:
                raise OSError("the first load fails (injected)")
        return self.real(model_id, *args, **kwargs)

    def go(self) -> None:
        self.release.set()


class Worker(threading.Thread):
    def __init__(self, target):
        super().__init__(daemon=True)
        self.work, self.error, self.result = target, None, None

    def run(self):
        try:
            self.result = self.work()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            self.error = error


def test_a_load_from_another_thread_waits_and_survives_the_first_ones_rollback(enabled, tmp_path, monkeypatch):
    expected_b = save_trained(tmp_path / "b", seed=2)
    save_trained(tmp_path / "a", seed=1)
    model = get_peft_model(make_base(), LoraConfig(target_modules=["0"]))
    parked = ParkedLoad(monkeypatch, tmp_path / "a", fail=True)

    first = Worker(lambda: model.load_adapter(str(tmp_path / "a"), "first"))
    first.start()
    assert parked.inside.wait(60)
    second = Worker(lambda: model.load_adapter(str(tmp_path / "b"), "b"))
    second.start()
    wait_until(lambda: waiting_for_the_model(second), "the second load waits for the first")
    assert "b" not in model.peft_config  # it has not started
    parked.go()
    first.join(60), second.join(60)

    assert isinstance(first.error, OSError) and "rolled back" in first.error.__notes__[-1]
    assert second.error is None
    assert set(model.peft_config) == {"default", "b"} and wrapped_adapters(model) == {"default", "b"}
    assert torch.equal(computes(model, "b"), expected_b)


def test_a_failing_load_waiting_for_another_thread_leaves_nothing(enabled, tmp_path, monkeypatch):
    expected_first = save_trained(tmp_path / "a", seed=1)
    save_trained(tmp_path / "bad", seed=2)
    weights = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    lora_a = next(key for key in weights if "lora_A" in key)
    weights[lora_a] = weights[lora_a][:3]  # a LoRA weight of another rank: refused once PEFT injected "y"
    save_file(weights, tmp_path / "bad" / "adapter_model.safetensors")
    model = get_peft_model(make_base(), LoraConfig(target_modules=["0"]))
    parked = ParkedLoad(monkeypatch, tmp_path / "a", fail=False)

    first = Worker(lambda: model.load_adapter(str(tmp_path / "a"), "first"))
    first.start()
    assert parked.inside.wait(60)
    second = Worker(lambda: model.load_adapter(str(tmp_path / "bad"), "y"))
    second.start()
    wait_until(lambda: waiting_for_the_model(second), "the second load waits for the first")
    parked.go()
    first.join(60), second.join(60)

    assert first.error is None
    assert isinstance(second.error, IncompatibleAdapterWeights), second.error
    assert set(model.peft_config) == {"default", "first"} and wrapped_adapters(model) == {"default", "first"}
    assert torch.equal(computes(model, "first"), expected_first)


def test_stock_peft_leaves_a_failed_load_behind(stock, tmp_path, monkeypatch):
    save_trained(tmp_path / "a", seed=1)
    model = get_peft_model(make_base(), LoraConfig(target_modules=["0"]))
    parked = ParkedLoad(monkeypatch, tmp_path / "a", fail=True)
    parked.go()

    with pytest.raises(OSError, match="injected"):
        model.load_adapter(str(tmp_path / "a"), "first")

    assert "first" in model.peft_config and "first" in wrapped_adapters(model)


def test_a_save_waits_for_another_threads_load(enabled, tmp_path, monkeypatch):
    expected_first = save_trained(tmp_path / "a", seed=1)
    model = get_peft_model(make_base(), LoraConfig(target_modules=["0"]))
    parked = ParkedLoad(monkeypatch, tmp_path / "a", fail=False)

    loader = Worker(lambda: model.load_adapter(str(tmp_path / "a"), "first"))
    loader.start()
    assert parked.inside.wait(60)
    saver = Worker(lambda: model.save_pretrained(tmp_path / "saved"))
    saver.start()
    wait_until(lambda: waiting_for_the_model(saver), "the save waits for the load")
    assert not (tmp_path / "saved").exists()
    parked.go()
    loader.join(60), saver.join(60)

    assert loader.error is None and saver.error is None
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(make_base(), tmp_path / "saved" / "first").eval()(X)
    assert torch.equal(reloaded, expected_first)


def test_nesting_in_one_thread_joins_and_another_thread_never_sees_the_transaction():
    layer = nn.Linear(2, 2)
    seen_elsewhere, entered_elsewhere = [], threading.Event()

    def elsewhere():
        seen_elsewhere.append(active_transaction(layer))
        with atomic(layer) as transaction:
            seen_elsewhere.append(transaction)
            entered_elsewhere.set()

    with atomic(layer) as outer:
        with atomic(layer) as inner:
            assert inner is outer and active_transaction(layer) is outer
        other = Worker(elsewhere)
        other.start()
        wait_until(lambda: waiting_for_the_model(other), "the other thread waits for the model")
        assert not entered_elsewhere.is_set()
    other.join(60)

    assert other.error is None
    assert seen_elsewhere[0] is None and seen_elsewhere[1] is not outer


def test_a_model_that_defines_eq_without_hash_still_gets_its_lock():
    class ComparedByValue(nn.Linear):
        def __eq__(self, other):  # makes instances unhashable (__hash__ = None)
            return isinstance(other, nn.Linear) and torch.equal(self.weight, other.weight)

    layer = ComparedByValue(2, 2)
    with atomic(layer) as transaction:
        assert active_transaction(layer) is transaction
    assert active_transaction(layer) is None
