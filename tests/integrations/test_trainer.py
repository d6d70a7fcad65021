"""HF Trainer with a PeftModel: checkpoints carry the extra state, and resuming continues identically.

Guards https://github.com/huggingface/peft/issues/1732 (BatchNorm statistics) and /issues/2099 (direct
parameters): stock PEFT checkpoints lose both, so a loaded checkpoint or a resumed run computes differently.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_buffers import BaseMismatchWarning

from .._atomic import FailAt
from ._tiny import STEM_NORM, images, logits, lora_config, resnet

STEPS, SAVE_EVERY = 6, 2
STAT = f"base_model.model.{STEM_NORM}.running_mean"


class Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 24):
        self.x = images(n, seed=7)
        self.y = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class RecordAtSave(TrainerCallback):
    """Eval logits and running statistics of the model at every checkpoint, by step."""

    def __init__(self):
        self.logits, self.stats = {}, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        self.logits[state.global_step] = logits(model)
        self.stats[state.global_step] = model.state_dict()[STAT].clone()
        model.train(was_training)


def peft_resnet():
    model = get_peft_model(resnet(0), lora_config())
    model.get_submodule(f"base_model.model.{STEM_NORM}").weight.requires_grad_(True)  # a direct parameter
    return model


def run(output_dir, resume_from=None):
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_EVERY, save_strategy="steps",
        per_device_train_batch_size=4, learning_rate=0.01, use_cpu=True, report_to=[], seed=0,
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, save_only_model=False,
    )
    recorder = RecordAtSave()
    model = peft_resnet()
    trainer = Trainer(model=model, args=args, train_dataset=Dataset(), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume_from)
    return model, recorder


@pytest.fixture
def uninterrupted(enabled, tmp_path):
    return tmp_path / "full", *run(tmp_path / "full")


# https://github.com/huggingface/peft/issues/1732 and /issues/2099
def test_each_checkpoint_loads_as_the_model_of_its_step(uninterrupted):
    output_dir, _, recorder = uninterrupted
    assert sorted(recorder.logits) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    for step, expected in recorder.logits.items():
        assert (output_dir / f"checkpoint-{step}" / "peft_buffers_base.json").is_file()  # the base it trains on
        with warnings.catch_warnings():
            warnings.simplefilter("error", BaseMismatchWarning)  # the same base: the check says nothing
            loaded = PeftModel.from_pretrained(resnet(0), output_dir / f"checkpoint-{step}")
        assert torch.equal(logits(loaded), expected), f"checkpoint-{step}"
    with pytest.warns(BaseMismatchWarning, match="tensors differ in value"):
        PeftModel.from_pretrained(resnet(1), output_dir / f"checkpoint-{STEPS}")  # a base of another seed


# https://github.com/huggingface/peft/issues/1732
def test_resume_from_checkpoint_continues_identically(uninterrupted, tmp_path):
    _, full_model, full = uninterrupted
    assert not torch.equal(full.stats[SAVE_EVERY], full.stats[STEPS])  # statistics move between checkpoints
    checkpoint = tmp_path / "crashed" / f"checkpoint-{SAVE_EVERY}"  # the run stopped after this checkpoint
    shutil.copytree(tmp_path / "full" / checkpoint.name, checkpoint)

    resumed_model, resumed = run(tmp_path / "crashed", resume_from=str(checkpoint))

    assert torch.equal(resumed.stats[STEPS], full.stats[STEPS])
    assert torch.equal(logits(resumed_model), logits(full_model))
    assert torch.equal(logits(resumed_model), full.logits[STEPS])


def test_a_checkpoint_save_that_fails_keeps_the_previous_adapter(enabled, tmp_path, monkeypatch):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=0.01, use_cpu=True, report_to=[], logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, save_strategy="no")
    trainer = Trainer(model=peft_resnet(), args=args, train_dataset=Dataset())
    out = tmp_path / "out"
    trainer.save_model(str(out))
    before = {name: (out / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}
    saved = logits(PeftModel.from_pretrained(resnet(0), out))
    trainer.train()
    trained = logits(trainer.model)
    assert not torch.equal(trained, saved)

    monkeypatch.setattr(os, "replace", FailAt(os.replace, 2))  # the weights file's move into place
    with pytest.raises(OSError, match="injected"):
        trainer.save_model(str(out))
    monkeypatch.undo()

    assert {name: (out / name).read_bytes() for name in before} == before
    assert torch.equal(logits(PeftModel.from_pretrained(resnet(0), out)), saved)
    trainer.save_model(str(out))
    assert torch.equal(logits(PeftModel.from_pretrained(resnet(0), out)), trained)
