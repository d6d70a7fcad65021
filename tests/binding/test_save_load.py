"""Behaviour through PEFT: what the adapter file carries and what loading restores.

Guards https://github.com/huggingface/peft/issues/1732 (BatchNorm statistics lost on reload) and
https://github.com/huggingface/peft/issues/2099 (direct parameters such as ViT position embeddings).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import save_and_load
from safetensors.torch import load_file, save_file

import peft_buffers
from peft_buffers import IncompatibleExtraState, PeftBuffersWarning
from tests.zoo import ZOO, logits, train, tuner_config, unfreeze_embeddings

from .._compat import PEFT_VERSION, requires_low_cpu_mem_usage
from .._warnings import first_seen

ADAPTER_FILE = "adapter_model.safetensors"
BN = "base_model.model.bn1d"


def trained_model(spec, tuner="lora", steps=3, seed=1, **config):
    model = get_peft_model(spec.make(), tuner_config(tuner, spec, **config))
    train(model, spec, steps=steps, seed=seed)
    return model


def saved_keys(path):
    return set(load_file(str(path / ADAPTER_FILE)))


def stat_keys(model):
    prefix = "base_model.model."
    return {
        f"{prefix}{name}.{buf}"
        for name, module in model.get_base_model().named_modules()
        if getattr(module, "track_running_stats", False) and module.running_mean is not None
        for buf in ("running_mean", "running_var", "num_batches_tracked")
    }


def changed_stat_keys(model, spec):
    """Running statistics that differ from a fresh base model's: what the file must carry (issue 9's rule)."""
    fresh, live = dict(spec.make().named_buffers()), dict(model.named_buffers())
    return {key for key in stat_keys(model) if not torch.equal(fresh[key[len("base_model.model."):]], live[key])}


TABLE = [
    ("resnet", "lora"),
    ("resnet", "loha"),
    ("resnet", "lokr"),
    ("resnet", "ia3"),
    ("mobilenet_v2", "lora"),
    ("mobilenet_v2", "loha"),
    ("mobilenet_v2", "lokr"),
    ("mobilenet_v2", "ia3"),
    ("mixed_norms", "lora"),
    ("mixed_norms", "ia3"),
]


# https://github.com/huggingface/peft/issues/1732
@pytest.mark.parametrize("model_name, tuner", TABLE)
def test_reload_is_bitwise_equal(enabled, tmp_path, model_name, tuner):
    spec = ZOO[model_name]
    model = trained_model(spec, tuner)
    x = spec.inputs(seed=99)
    expected = logits(model, x)
    model.save_pretrained(tmp_path, safe_serialization=True)

    loaded = PeftModel.from_pretrained(spec.make(), tmp_path).eval()

    assert torch.equal(logits(loaded, x), expected)
    assert changed_stat_keys(model, spec) <= saved_keys(tmp_path)
    assert changed_stat_keys(model, spec)  # training moved statistics: the test can fail


# https://github.com/huggingface/peft/issues/1732
@pytest.mark.parametrize("model_name", ["resnet", "mixed_norms"])
def test_without_peft_buffers_the_reload_differs(stock, tmp_path, model_name):
    spec = ZOO[model_name]
    model = trained_model(spec)
    x = spec.inputs(seed=99)
    model.save_pretrained(tmp_path, safe_serialization=True)

    loaded = PeftModel.from_pretrained(spec.make(), tmp_path).eval()

    assert not stat_keys(model) & saved_keys(tmp_path)
    assert not torch.equal(logits(loaded, x), logits(model, x))


def test_file_carries_exactly_adapter_plus_running_statistics(tmp_path):
    spec = ZOO["mixed_norms"]
    model = trained_model(spec)
    peft_buffers.disable()
    model.save_pretrained(tmp_path / "stock", safe_serialization=True)
    peft_buffers.enable()  # after training: the base values were never seen, so every statistic is carried
    try:
        with pytest.warns(PeftBuffersWarning, match=first_seen(9)):
            model.save_pretrained(tmp_path / "ours", safe_serialization=True)
    finally:
        peft_buffers.disable()
    prefix = "base_model.model."
    expected_extra = {
        f"{prefix}{m}.{b}"
        for m in ("bn2d", "inorm", "bn1d")
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "stock") | expected_extra
    ours = load_file(str(tmp_path / "ours" / ADAPTER_FILE))
    assert ours[f"{prefix}bn2d.num_batches_tracked"].item() == 3  # cumulative average needs the count
    assert torch.equal(ours[f"{prefix}bn1d.running_var"], model.base_model.model.bn1d.running_var)


# https://github.com/huggingface/peft/issues/2099
@pytest.mark.parametrize("is_trainable", [False, True])
def test_vit_direct_parameters_round_trip(enabled, tmp_path, is_trainable):
    spec = ZOO["vit"]
    model = get_peft_model(spec.make(), tuner_config("lora", spec))
    direct = unfreeze_embeddings(model)
    train(model, spec)
    x = spec.inputs(seed=99)
    expected = logits(model, x)
    model.save_pretrained(tmp_path, safe_serialization=True)

    keys = saved_keys(tmp_path)
    assert set(direct) <= keys
    assert not any(k.startswith("base_model.model.vit.embeddings.patch_embeddings") for k in keys)  # not the parent

    loaded = PeftModel.from_pretrained(spec.make(), tmp_path, is_trainable=is_trainable).eval()
    assert torch.equal(logits(loaded, x), expected)
    embeddings = loaded.get_base_model().vit.embeddings
    assert embeddings.position_embeddings.requires_grad is is_trainable
    assert embeddings.cls_token.requires_grad is is_trainable


def test_resumed_training_continues_identically(enabled, tmp_path):
    spec = ZOO["mixed_norms"]  # momentum=None BatchNorm: the average depends on num_batches_tracked
    model = trained_model(spec, steps=2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    resumed = PeftModel.from_pretrained(spec.make(), tmp_path, is_trainable=True)

    train(model, spec, steps=2, seed=10)
    train(resumed, spec, steps=2, seed=10)

    x = spec.inputs(seed=99)
    assert torch.equal(logits(resumed, x), logits(model, x))
    for name in ("bn2d", "bn1d", "inorm"):
        ours, theirs = getattr(resumed.base_model.model, name), getattr(model.base_model.model, name)
        assert torch.equal(ours.running_mean, theirs.running_mean)
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def test_stock_peft_loads_our_file_silently(tmp_path, recwarn):
    # Files written with peft_buffers stay useful to plain-PEFT users (single adapter).
    spec = ZOO["resnet"]
    model = trained_model(spec)
    peft_buffers.enable()
    try:
        model.save_pretrained(tmp_path, safe_serialization=True)
    finally:
        peft_buffers.disable()
    loaded = PeftModel.from_pretrained(spec.make(), tmp_path).eval()
    x = spec.inputs(seed=99)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert not [w for w in recwarn if "unexpected" in str(w.message).lower()]


def test_enabled_loads_a_stock_file_as_stock_does(tmp_path):
    spec = ZOO["resnet"]
    model = trained_model(spec)
    model.save_pretrained(tmp_path, safe_serialization=True)  # peft_buffers disabled: a stock file
    x = spec.inputs(seed=99)
    stock_out = logits(PeftModel.from_pretrained(spec.make(), tmp_path).eval(), x)
    peft_buffers.enable()
    try:
        ours = PeftModel.from_pretrained(spec.make(), tmp_path).eval()
        assert torch.equal(logits(ours, x), stock_out)
    finally:
        peft_buffers.disable()


@requires_low_cpu_mem_usage
def test_low_cpu_mem_usage(enabled, tmp_path):
    spec = ZOO["resnet"]
    model = trained_model(spec)
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = PeftModel.from_pretrained(spec.make(), tmp_path, low_cpu_mem_usage=True).eval()
    x = spec.inputs(seed=99)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_values_come_from_the_state_dict_argument(enabled):
    # FSDP / DeepSpeed hand in a gathered state dict: save what it holds, not the live tensors.
    spec = ZOO["mixed_norms"]
    model = trained_model(spec)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    key = "base_model.model.bn1d.running_mean"
    full[key] = full[key] + 1.0
    saved = save_and_load.get_peft_model_state_dict(model, state_dict=full)
    assert torch.equal(saved[key], full[key])
    assert not torch.equal(saved[key], model.base_model.model.bn1d.running_mean)


def test_unwrap_compiled_saves_the_same_keys(enabled):
    spec = ZOO["mixed_norms"]
    model = trained_model(spec)
    plain = save_and_load.get_peft_model_state_dict(model)
    compiled = save_and_load.get_peft_model_state_dict(torch.compile(model), unwrap_compiled=True)
    assert compiled.keys() == plain.keys()
    assert "base_model.model.bn1d.running_mean" in compiled


def test_modules_to_save_norm_is_left_to_peft(tmp_path):
    # PEFT's documented workaround for #1732 saves the whole norm layer itself; we add only the others.
    spec = ZOO["mixed_norms"]
    model = trained_model(spec, modules_to_save=["bn1d"])
    model.save_pretrained(tmp_path / "stock", safe_serialization=True)
    peft_buffers.enable()
    try:
        with pytest.warns(PeftBuffersWarning, match=first_seen(6)):  # bn1d is PEFT's: 2 x 3 statistics
            model.save_pretrained(tmp_path / "ours", safe_serialization=True)
        loaded = PeftModel.from_pretrained(spec.make(), tmp_path / "ours").eval()
    finally:
        peft_buffers.disable()
    stock = saved_keys(tmp_path / "stock")
    assert {f"{BN}.running_mean", f"{BN}.weight"} <= stock
    added = {f"base_model.model.{m}.{b}" for m in ("bn2d", "inorm") for b in ("running_mean", "running_var",
                                                                            "num_batches_tracked")}
    assert saved_keys(tmp_path / "ours") == stock | added
    x = spec.inputs(seed=99)
    assert torch.equal(logits(loaded, x), logits(model, x))


# ------------------------------------------------------------------------------------------ multi-adapter


@pytest.fixture
def two_adapters(tmp_path):
    """Adapters A and B trained separately on different data; their outputs; a base output."""
    spec = ZOO["mixed_norms"]
    x = spec.inputs(seed=99)
    peft_buffers.enable()
    out = {}
    for name, seed in (("A", 1), ("B", 50)):
        model = trained_model(spec, steps=3, seed=seed)
        out[name] = logits(model, x)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
    out["base"] = logits(spec.make().eval(), x)
    yield spec, x, out, tmp_path
    peft_buffers.disable()


def load_a_and_b(spec, path):
    """A fresh base with adapter A loaded (active) and adapter B loaded next to it."""
    model = PeftModel.from_pretrained(spec.make(), path / "A", adapter_name="A").eval()
    model.load_adapter(path / "B", adapter_name="B")
    return model


def test_each_adapter_keeps_its_own_state(two_adapters):
    spec, x, out, path = two_adapters
    model = PeftModel.from_pretrained(spec.make(), path / "A", adapter_name="A").eval()
    assert torch.equal(logits(model, x), out["A"])

    model.load_adapter(path / "B", adapter_name="B")
    assert torch.equal(logits(model, x), out["A"]), "loading B must not change what A computes"

    model.set_adapter("B")
    assert torch.equal(logits(model, x), out["B"])
    model.set_adapter("A")
    assert torch.equal(logits(model, x), out["A"])

    with model.disable_adapter():
        assert torch.equal(logits(model, x), out["base"])
    assert torch.equal(logits(model, x), out["A"])

    model.set_adapter("B")
    with model.disable_adapter():
        assert torch.equal(logits(model, x), out["base"])
    assert torch.equal(logits(model, x), out["B"])


def test_delete_adapter_forgets_its_state(two_adapters):
    spec, x, out, path = two_adapters
    model = load_a_and_b(spec, path)
    store = model.__dict__["_peft_buffers_store"]
    assert "B" in store.owned
    model.delete_adapter("B")
    assert "B" not in store.owned and "B" not in store.stored
    assert torch.equal(logits(model, x), out["A"])


def test_disable_adapter_after_training_uses_base_statistics(enabled):
    spec = ZOO["mixed_norms"]
    model = trained_model(spec)
    x = spec.inputs(seed=99)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), logits(spec.make().eval(), x))


def test_save_of_inactive_adapter_carries_its_own_state(two_adapters, tmp_path):
    spec, x, out, path = two_adapters
    model = load_a_and_b(spec, path)
    model.save_pretrained(tmp_path / "both", safe_serialization=True)  # saves A at the root and B under B/
    reloaded = PeftModel.from_pretrained(spec.make(), tmp_path / "both" / "B").eval()
    assert torch.equal(logits(reloaded, x), out["B"])


# -------------------------------------------------------------------------------------------- bad input


def _tamper(path, change):
    file = path / ADAPTER_FILE
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "change, key, expected_text",
    [
        (
            lambda t: t.__setitem__(f"{BN}.running_mean", torch.zeros(32)),
            f"{BN}.running_mean",
            "running statistic has another shape; expected shape (16,) (the model's), found shape (32,) (the "
            "file's). Fix: the base model differs from the one the adapter was trained on",
        ),
        (
            lambda t: t.__setitem__("base_model.model.layer9.bn.running_var", torch.ones(3)),
            "base_model.model.layer9.bn.running_var",
            "names no module of the base model; expected a module at base_model.model.layer9.bn, found no "
            "module 'layer9' in base_model.model",
        ),
        (
            lambda t: t.__setitem__(f"{BN}.num_batches_tracked", torch.tensor(3.5)),
            f"{BN}.num_batches_tracked",
            "running statistic has a dtype of another kind; expected a integer dtype like the model's "
            "torch.int64, found torch.float32",
        ),
    ],
    ids=["shape", "no-module", "dtype"],
)
def test_bad_file_raises_and_leaves_model_untouched(enabled, tmp_path, change, key, expected_text):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path / "bad", safe_serialization=True)
    _tamper(tmp_path / "bad", change)
    trained_model(spec, seed=7).save_pretrained(tmp_path / "good", safe_serialization=True)
    model = PeftModel.from_pretrained(spec.make(), tmp_path / "good", adapter_name="A").eval()
    before = _snapshot(model)
    x = spec.inputs(seed=99)
    out = logits(model, x)

    with pytest.raises(IncompatibleExtraState) as info:
        model.load_adapter(tmp_path / "bad", adapter_name="B")

    assert [m.key for m in info.value.mismatches] == [key]
    assert expected_text in str(info.value)
    assert "B" not in model.peft_config
    _assert_untouched(model, before)
    assert torch.equal(logits(model, x), out)


def test_all_offending_keys_are_named_at_once(enabled, tmp_path):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path, safe_serialization=True)

    def change(t):
        t[f"{BN}.running_mean"] = torch.zeros(2)
        t[f"{BN}.running_var"] = torch.zeros(2)

    _tamper(tmp_path, change)
    base = spec.make()
    before = [(t, t.detach().clone()) for t in [*base.parameters(), *base.buffers()]]
    with pytest.raises(IncompatibleExtraState) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert sorted(m.key for m in info.value.mismatches) == [f"{BN}.running_mean", f"{BN}.running_var"]
    assert all(torch.equal(tensor, value) for tensor, value in before)  # no tensor of the base changed


def test_module_without_statistics_is_reported(enabled, tmp_path):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path, safe_serialization=True)
    base = spec.make()
    base.bn1d = torch.nn.BatchNorm1d(16, track_running_stats=False)
    before = [(t, t.detach().clone()) for t in [*base.parameters(), *base.buffers()]]
    with pytest.raises(IncompatibleExtraState) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(tensor, value) for tensor, value in before)
    assert {m.key for m in info.value.mismatches} == {f"{BN}.{n}" for n in ("running_mean", "running_var",
                                                                          "num_batches_tracked")}
    assert "track_running_stats=True" in str(info.value)


def test_restored_tensors_take_the_models_dtype(enabled, tmp_path):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(peft_buffers.BaseMismatchWarning, match="trained on float32 weights, loading onto float64"):
        loaded = PeftModel.from_pretrained(spec.make().double(), tmp_path)  # restored anyway, and named
    bn = loaded.base_model.model.bn1d
    assert bn.running_mean.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.int64


def test_module_modes_are_not_changed_by_loading(tmp_path):
    spec = ZOO["mixed_norms"]
    trained_model(spec).save_pretrained(tmp_path, safe_serialization=True)
    modes = {}
    for on in (False, True):
        if on:
            peft_buffers.enable()
        try:
            base = spec.make().train()
            model = get_peft_model(base, tuner_config("lora", spec))
            model.train()
            model.load_adapter(tmp_path, adapter_name="other")
            modes[on] = [m.training for m in model.modules()]
        finally:
            peft_buffers.disable()
    assert modes[True] == modes[False]


def test_set_peft_model_state_dict_result_hides_our_keys(enabled, tmp_path):
    # transformers 4.x load_adapter reads missing/unexpected keys from this result.
    spec = ZOO["mixed_norms"]
    model = trained_model(spec)
    # looked up at call time: a name imported before enable() stays PEFT's original (see README)
    state = save_and_load.get_peft_model_state_dict(model)
    result = save_and_load.set_peft_model_state_dict(model, state)
    assert type(result).__name__ == "_IncompatibleKeys"
    ours = {k for k in state if "lora_" not in k}
    assert not ours & set(result.unexpected_keys)
    assert not ours & set(result.missing_keys)


def test_loaded_extra_state_is_the_models_own_copy(enabled):
    # Stock load_state_dict copies into the model; so must we: a caller reusing their state dict (or a file's
    # tensors, which sit at arbitrary offsets of safetensors' buffer) must not become the model's storage.
    spec = ZOO["mixed_norms"]
    state = {k: v.clone() for k, v in save_and_load.get_peft_model_state_dict(trained_model(spec)).items()}
    model = get_peft_model(spec.make(), tuner_config("lora", spec))
    save_and_load.set_peft_model_state_dict(model, state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for value in state.values():
        value.add_(1) if value.is_floating_point() else value.fill_(-7)
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])] == []


def test_peft_version_is_the_one_under_test():
    assert PEFT_VERSION.release >= (0, 6)


def test_deepcopy_gives_an_independent_model(two_adapters):
    # DPO-style reference models are deep copies; the copy must switch its own tensors, not the original's.
    import copy

    spec, x, out, path = two_adapters
    model = load_a_and_b(spec, path)
    clone = copy.deepcopy(model)
    clone.set_adapter("B")
    assert torch.equal(logits(clone, x), out["B"])
    assert torch.equal(logits(model, x), out["A"])


def test_deepcopy_before_training_keeps_the_copys_base_statistics(enabled):
    import copy

    spec = ZOO["mixed_norms"]
    model = get_peft_model(spec.make(), tuner_config("lora", spec))
    clone = copy.deepcopy(model)
    train(clone, spec)
    x = spec.inputs(seed=99)
    with clone.disable_adapter():
        assert torch.equal(logits(clone, x), logits(spec.make().eval(), x))


def test_whole_model_pickling_round_trips(two_adapters, tmp_path):
    spec, x, out, path = two_adapters
    model = load_a_and_b(spec, path)
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    restored.set_adapter("B")
    assert torch.equal(logits(restored, x), out["B"])


def test_base_parameters_peft_saves_itself_stay_peft_s(enabled, tmp_path):
    # bias="all": PEFT saves the (trainable) biases itself; they must not be duplicated or managed per adapter.
    spec = ZOO["mixed_norms"]
    model = trained_model(spec, bias="all")
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = PeftModel.from_pretrained(spec.make(), tmp_path).eval()
    x = spec.inputs(seed=99)
    assert torch.equal(logits(loaded, x), logits(model, x))
    store = loaded.__dict__["_peft_buffers_store"]
    # InstanceNorm never counts batches: its num_batches_tracked did not change, so no file carries it (issue 9).
    assert store.owned_keys("default") == {
        f"base_model.model.{m}.{b}" for m in ("bn2d", "inorm", "bn1d")
        for b in ("running_mean", "running_var", "num_batches_tracked")
    } - {"base_model.model.inorm.num_batches_tracked"}
