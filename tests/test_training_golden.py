"""The training loop's loss curve on a tiny model, held to numbers recorded from a reference run.

Two short runs cover the loop's paths: the fast path with an unshared editor, a cosine
schedule, a weight average, a late locality weight with hard inputs drawn by true answer and
then by key nearness, and batched edits on half the steps; and the reference path with
default sampling. Any change to what a step computes or in which order moves these numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fact_requests, tiny_model

from mend.config import EditorConfig, LossWeights, Sampling, Schedule, Speed, TrainConfig
from mend.training.logs import LOG_FILE
from mend.training.loop import train

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_training_losses.json").read_text())
RUNS = {
    "fast": TrainConfig(
        editor=EditorConfig(rank=16, share=False),
        loss=LossWeights(locality_late=3.0),
        sampling=Sampling(loc_per_edit=2, hard_locality="answer", hard_locality_late="nearest",
                          nearest_k=4, batch_size=2, batch_fraction=0.5),
        schedule=Schedule(lr=3e-3, alpha_lr=1e-1, max_steps=12, val_every=4, val_edits=8,
                          warmup_steps=2, cosine=True, ema=0.9, late_fraction=0.5),
        speed=Speed(lower_precision="fp32"),
        key_text=None,
        seed=3,
    ),
    "reference": TrainConfig(
        editor=EditorConfig(rank=16),
        loss=LossWeights(edit=0.5),
        sampling=Sampling(loc_per_edit=2),
        schedule=Schedule(lr=3e-3, alpha_lr=1e-1, max_steps=8, val_every=4, val_edits=8,
                          warmup_steps=2),
        speed=Speed(reference=True, lower_precision="fp32"),
        key_text=None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RUNS))
def test_training_reproduces_the_recorded_loss_curve(tmp_path, tokenizer, name):
    torch.set_num_threads(1)
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, RUNS[name], tmp_path,
          progress=False)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    losses = [x["loss"] for x in lines if "val" not in x]
    val_losses = [x["val"]["loss"] for x in lines if "val" in x]
    want = GOLDEN[name]
    assert len(losses) == len(want["loss"]) and len(set(losses)) > 1
    # Recorded on an x86-64 CPU with one thread; another CPU's kernels may round differently.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want["loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(val_losses), torch.tensor(want["val_loss"]),
                               rtol=1e-5, atol=0)  # fmt: skip
    if losses == want["loss"]:
        return  # bit for bit (the usual case on the recording machine)
