"""The core, plain torch: discovery, naming, validation and the per-adapter store."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peft_buffers.core import (
    BASE,
    ExtraStateStore,
    ModelView,
    TensorPlace,
    find_base_tensors,
    find_running_stats,
    find_trainable_parameters,
    plan_load,
    tracks_running_stats,
)


class LookAlikeNorm(nn.Module):
    """A third-party norm that is no BatchNorm subclass but keeps running statistics the same way."""

    def __init__(self, n):
        super().__init__()
        self.track_running_stats = True
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.BatchNorm1d(3), True),
        (nn.BatchNorm2d(3), True),
        (nn.BatchNorm3d(3), True),
        (nn.SyncBatchNorm(3), True),
        (nn.BatchNorm2d(3, momentum=None), True),
        (nn.InstanceNorm2d(3, track_running_stats=True), True),
        (LookAlikeNorm(3), True),
        (nn.InstanceNorm2d(3), False),
        (nn.BatchNorm2d(3, track_running_stats=False), False),
        (nn.GroupNorm(1, 3), False),
        (nn.LayerNorm(3), False),
        (nn.LazyBatchNorm2d(), False),  # uninitialised: nothing to save yet
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_tracks_running_stats(module, expected):
    assert tracks_running_stats(module) is expected


def test_lazy_norm_counts_once_initialised():
    net = nn.Sequential(nn.LazyBatchNorm2d())
    assert find_running_stats(ModelView(base=net)) == {}
    net(torch.randn(2, 5, 4, 4))
    assert sorted(find_running_stats(ModelView(base=net))) == [
        "0.num_batches_tracked", "0.running_mean", "0.running_var",
    ]


def test_keys_carry_the_prefix_and_skip_transparent_wrappers():
    inner = nn.Module()
    inner.add_module("_fsdp_wrapped_module", nn.Sequential(nn.BatchNorm1d(2)))
    root = nn.Module()
    root.add_module("body", inner)
    view = ModelView(base=root, base_prefix="base_model.model.")
    assert sorted(find_running_stats(view)) == [
        "base_model.model.body.0.num_batches_tracked",
        "base_model.model.body.0.running_mean",
        "base_model.model.body.0.running_var",
    ]


def test_view_skips_owned_subtrees_and_descends_only_into_allowed_children():
    class Owned(nn.Sequential):
        pass

    class Tuner(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.BatchNorm1d(2)
            self.adapter = nn.BatchNorm1d(2)

    net = nn.Sequential(Owned(nn.BatchNorm1d(2)), Tuner())
    view = ModelView(base=net, owned_types=(Owned,), partial_types=(Tuner,))
    stats = find_running_stats(view)
    # base keys leave the wrapper's segment out (issue 10: other adapters add and remove wrappers)
    assert {k.rsplit(".", 1)[0] for k in stats} == {"1"}
    assert {p.live_key.rsplit(".", 1)[0] for p in stats.values()} == {"1.base_layer"}


def test_trainable_parameters_are_found_once_by_first_name():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, shared, nn.Linear(2, 2))
    net[2].requires_grad_(False)
    assert sorted(find_trainable_parameters(ModelView(base=net))) == ["0.bias", "0.weight"]


# ------------------------------------------------------------------------------------------- plan_load


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    return net, ModelView(base=net, base_prefix="m.")


def test_plan_sorts_extra_state_from_peft_keys():
    net, view = _net()
    plan = plan_load(
        view,
        {
            "m.1.running_mean": torch.ones(3),
            "m.0.bias": torch.ones(3),
            "m.0.lora_A.weight": torch.ones(1),
            "prompt_encoder.embedding.weight": torch.ones(1),
        },
        claimed_by_peft=lambda candidates: set(),
    )
    assert sorted(plan.extra) == ["m.0.bias", "m.1.running_mean"]
    assert sorted(plan.passthrough) == ["prompt_encoder.embedding.weight"]  # outside the base model
    # m.0 is no tuner layer here: a key below it that names nothing is an error, not silently dropped (issue 10)
    assert [m.key for m in plan.mismatches] == ["m.0.lora_A.weight"]


def test_plan_leaves_parameters_peft_claims_to_peft():
    net, view = _net()
    asked = []

    def claimed_by_peft(candidates):
        asked.append(sorted(candidates))
        return {"m.0.bias"}

    plan = plan_load(view, {"m.0.bias": torch.ones(3), "m.0.weight": torch.ones(3, 2)}, claimed_by_peft=claimed_by_peft)
    assert asked == [["m.0.bias", "m.0.weight"]]  # asked once, with the live parameters
    assert list(plan.extra) == ["m.0.weight"] and list(plan.passthrough) == ["m.0.bias"]


def test_plan_converts_to_the_models_dtype_without_touching_the_model():
    net, view = _net()
    net.double()
    before = net[1].running_mean.clone()
    plan = plan_load(view, {"m.1.running_mean": torch.ones(3, dtype=torch.float32)})
    place, value = plan.extra["m.1.running_mean"]
    assert value.dtype == torch.float64 and place.tensor is net[1].running_mean
    assert torch.equal(net[1].running_mean, before)


def test_plan_reports_every_mismatch_with_expected_and_found():
    net, view = _net()
    plan = plan_load(
        view,
        {
            "m.1.running_mean": torch.ones(4),
            "m.1.num_batches_tracked": torch.tensor(1.5),
            "m.7.running_var": torch.ones(3),
            "m.0.running_mean": torch.ones(3),
        },
    )
    found = {m.key: (m.expected, m.found) for m in plan.mismatches}
    assert found == {
        "m.1.running_mean": ("shape (3,) (the model's)", "shape (4,) (the file's)"),
        "m.1.num_batches_tracked": ("a integer dtype like the model's torch.int64", "torch.float32"),
        "m.7.running_var": ("a module at m.7", "no module '7' in m"),
        "m.0.running_mean": ("Linear with track_running_stats=True", "Linear without running buffers"),
    }
    assert plan.extra == {}


def test_ignore_mismatched_sizes_drops_instead_of_failing():
    net, view = _net()
    plan = plan_load(view, {"m.1.running_mean": torch.ones(4)}, ignore_mismatched_sizes=True)
    assert plan.mismatches == [] and [m.key for m in plan.dropped] == ["m.1.running_mean"]


# ----------------------------------------------------------------------------------------------- store


def _bn_store(live="a"):
    bn = nn.BatchNorm1d(2)
    store = ExtraStateStore(live=live)
    place = TensorPlace("rm", bn, "running_mean", False)
    return bn, store, place


def test_switching_swaps_storage_in_place_keeping_the_tensor_object():
    bn, store, place = _bn_store()
    tensor_object = bn.running_mean
    store.set_values("b", {"rm": (place, torch.full((2,), 5.0))})
    store.switch("b")
    assert bn.running_mean is tensor_object and bn.running_mean.tolist() == [5.0, 5.0]
    store.switch(BASE)
    assert bn.running_mean.tolist() == [0.0, 0.0]
    store.switch("b")
    assert bn.running_mean.tolist() == [5.0, 5.0]


def test_owner_without_own_value_computes_with_the_base_value():
    bn, store, place = _bn_store()
    store.set_values("a", {"rm": (place, torch.full((2,), 1.0))})  # live owner: applied at once
    assert bn.running_mean.tolist() == [1.0, 1.0]
    store.switch("c")
    assert bn.running_mean.tolist() == [0.0, 0.0]


def test_a_change_while_an_adapter_is_live_becomes_its_own():
    # issue 9: base values are taken at attach, whatever entry point later runs the model
    bn = nn.BatchNorm1d(2)
    view = ModelView(base=bn)
    store = ExtraStateStore(live="a", view=view)
    store.capture(find_base_tensors(view))
    bn.running_mean.add_(3.0)  # training in place, no hook involved
    assert store.settle(find_base_tensors(view)) == {"running_mean"}
    store.switch(BASE)
    assert bn.running_mean.tolist() == [0.0, 0.0]
    store.switch("a")
    assert bn.running_mean.tolist() == [3.0, 3.0]


def test_forget_refuses_the_live_owner_and_drops_others():
    bn, store, place = _bn_store()
    store.set_values("b", {"rm": (place, torch.ones(2))})
    with pytest.raises(RuntimeError, match="switch away first"):
        store.forget("a")
    store.forget("b")
    assert "b" not in store.owned and "b" not in store.stored


def test_direct_parameter_trainability_follows_the_owner():
    lin = nn.Linear(2, 2)
    lin.bias.requires_grad_(False)
    store = ExtraStateStore(live=BASE)
    place = TensorPlace("bias", lin, "bias", True)
    store.set_values("t", {"bias": (place, torch.ones(2))}, trainable=True)
    store.set_values("f", {"bias": (place, torch.zeros(2))}, trainable=False)
    store.switch("t")
    assert lin.bias.requires_grad is True
    store.switch("f")
    assert lin.bias.requires_grad is False
    store.switch(BASE)
    assert lin.bias.requires_grad is False


OWNERS = ["a", "b", "c", BASE]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("set"), st.sampled_from(["a", "b", "c"]), st.integers(0, 2), st.integers(1, 9)),
            st.tuples(st.just("switch"), st.sampled_from(OWNERS)),
            st.tuples(st.just("train"), st.integers(0, 2), st.integers(1, 9)),
        ),
        max_size=30,
    )
)
def test_store_matches_a_reference_model(ops):
    """Whatever the sequence, the live tensors hold the live owner's values (or the base's)."""
    bns = nn.Sequential(*[nn.BatchNorm1d(1) for _ in range(3)])
    places = {f"k{i}": TensorPlace(f"{i}.running_mean", bn, "running_mean", False) for i, bn in enumerate(bns)}
    view = ModelView(base=bns)
    store = ExtraStateStore(live="a", view=view)
    store.capture(find_base_tensors(view))
    reference = {BASE: {k: 0.0 for k in places}, "a": {}, "b": {}, "c": {}}
    live = "a"

    def expected(owner, key):
        return reference[owner].get(key, reference[BASE][key]) if owner is not BASE else reference[BASE][key]

    for op in ops:
        if op[0] == "set":
            _, owner, index, value = op
            key = f"k{index}"
            store.settle(find_base_tensors(view))
            store.set_values(owner, {places[key].key: (places[key], torch.full((1,), float(value)))})
            reference[owner][key] = float(value)
        elif op[0] == "switch":
            store.settle(find_base_tensors(view))
            store.switch(op[1])
            live = op[1]
        else:  # training changes whatever is live; what changed becomes the live owner's at the next settle
            _, index, value = op
            key = f"k{index}"
            if live is not BASE and key not in reference[live]:
                reference[live][key] = reference[BASE][key]
            places[key].tensor.add_(float(value))
            target = reference[BASE] if live is BASE else reference[live]
            target[key] += float(value)
        for key, place in places.items():
            assert place.tensor.item() == expected(live, key)
    store.settle(find_base_tensors(view))
    for owner in OWNERS:
        for key, place in places.items():  # keys never set or trained are not managed: the base's value
            value = store.value(owner, place.key) if place.key in store.places else place.tensor
            assert value.item() == expected(owner, key)
