"""Training configuration: grouped, round-trips through JSON, reads what earlier versions wrote;
recipes load, validate and take overrides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fact_requests, tiny_model

from mend.checkpoint import load_editor, load_train_state
from mend.config import TrainConfig
from mend.errors import MendError
from mend.training.logs import LOG_FILE
from mend.training.loop import train
from mend.training.recipe import load_recipe, recipe_names

LEGACY = Path(__file__).parent / "data" / "legacy_run"  # written by the flat-config trainer


def test_config_round_trips_through_json():
    cfg = TrainConfig().override("schedule.ema", 0.99).override("sampling.batch_size", 2)
    cfg = cfg.override("editor.edit_modules", ["model.layers.0.mlp.down_proj"])
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.schedule.ema == 0.99 and again.sampling.batch_size == 2
    assert again.editor.edit_modules == ("model.layers.0.mlp.down_proj",)
    assert set(cfg.to_dict()) >= {"editor", "loss", "sampling", "schedule", "speed", "seed"}


def test_flat_configs_of_earlier_versions_map_onto_the_groups():
    flat = {"batch_size": 8, "joint_edits": 2, "joint_fraction": 0.5, "c_loc": 2.0,
            "c_loc_late": 5.0, "hard_locality_late": "nearest", "lower_precision": "bf16",
            "max_steps": 7000, "cosine": True, "c_gap": 0.0, "c_size": 0.0, "grad_accum": 1,
            "select": "accuracy", "edit_loss_on_prompt": True, "seed": 1}  # fmt: skip
    cfg = TrainConfig.from_dict(flat)
    assert (cfg.sampling.edits_per_step, cfg.sampling.batch_size) == (8, 2)
    assert cfg.sampling.batch_fraction == 0.5 and cfg.sampling.hard_locality_late == "nearest"
    assert (cfg.loss.locality, cfg.loss.locality_late) == (2.0, 5.0)
    assert cfg.speed.lower_precision == "bf16" and cfg.schedule.max_steps == 7000
    assert cfg.schedule.cosine and cfg.seed == 1
    # A retired setting at a value other than the one that behaves as now is refused.
    with pytest.raises(MendError, match="c_gap"):
        TrainConfig.from_dict(flat | {"c_gap": 0.5})
    with pytest.raises(MendError, match="unknown keys"):
        TrainConfig.from_dict({"c_lco": 1.0})


@pytest.mark.parametrize(
    "key, value",
    [("schedule.lr", 0), ("sampling.batch_size", 3), ("speed.lower_precision", "fp16"),
     ("schedule.nonsense", 1), ("nonsense", 1), ("loss.edit.x", 1), ("sampling.hard_locality", "x")],
)  # fmt: skip
def test_override_refuses_unknown_or_invalid_settings(key, value):
    with pytest.raises(MendError):
        TrainConfig().override(key, value)


def test_an_editor_folder_of_the_earlier_trainer_loads_and_resumes_exactly(tmp_path, tokenizer):
    """`last/` written by the flat-config trainer: the editor loads, and resuming it with this
    code gives the same losses as an uninterrupted run of this code."""
    model = tiny_model("llama", len(tokenizer))
    assert load_editor(LEGACY / "last", model).cfg.rank == 4
    cfg = TrainConfig.from_dict(load_train_state(LEGACY / "last")["config"])
    cfg = cfg.override("schedule.max_steps", 8)
    data, val = fact_requests(60, seed=1), fact_requests(8, seed=2)
    torch.set_num_threads(1)
    shutil.copytree(LEGACY, tmp_path / "old")
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path / "old",
          resume=True, progress=False)  # fmt: skip
    train(tiny_model("llama", len(tokenizer)), tokenizer, data, val, cfg, tmp_path / "new",
          progress=False)  # fmt: skip

    def losses(folder):
        lines = [json.loads(x) for x in (folder / LOG_FILE).read_text().splitlines()]
        return [x["loss"] for x in lines if "val" not in x]

    old, new = losses(tmp_path / "old"), losses(tmp_path / "new")
    assert len(old) == len(new) == 8 and len(set(new)) > 1
    torch.testing.assert_close(torch.tensor(old), torch.tensor(new), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    # its data, or (records a user builds, e.g. `mend data wikitext`) the description says to
    # give them with --data: `mend train` refuses the recipe without them
    assert recipe.description and (recipe.data or "--data" in recipe.description)
    # Precision travels between machines: bf16 only where it is fast, never forced.
    assert recipe.config.speed.lower_precision == "auto"


def test_the_shipped_recipes_hold_the_published_settings():
    cf = load_recipe("counterfact").config
    assert not cf.editor.share and cf.seed == 1 and cf.loss.locality_late == 5.0
    # settings a recipe leaves out keep the library's defaults (the preconditioner among them)
    assert cf.editor.precondition == TrainConfig().editor.precondition == 0.1
    assert cf.editor.rank == 512 and cf.sampling.edits_per_step == 4
    assert (cf.sampling.hard_locality, cf.sampling.hard_locality_late) == ("answer", "nearest")
    assert (cf.schedule.max_steps, cf.schedule.minutes, cf.schedule.ema) == (7000, 58, 0.998)
    assert load_recipe("zsre").val == "zsre-eval[600:]"
    assert load_recipe("counterfact-batched").needs_init


def test_a_recipe_file_is_validated(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"data": "x.json", "config": {"schedule": {"lr": 1e-3}}}))
    assert load_recipe(path).config.schedule.lr == 1e-3
    for bad in ({"config": {"schedule": {"lr": -1}}}, {"confg": {}},
                {"config": {"loss": {"locality": "high"}}}, []):  # fmt: skip
        path.write_text(json.dumps(bad))
        with pytest.raises(MendError, match="recipe"):
            load_recipe(path)
    path.write_text("{not json")
    with pytest.raises(MendError, match="cannot read"):
        load_recipe(path)
    with pytest.raises(MendError, match="no recipe 'nope'"):
        load_recipe("nope")
