"""A criterion that names a stage of the recipe (FT's paraphrase stage) fails validation, in one line,
when the recipe does not have that stage, e.g. when methods are combined and another method's stages win."""
from __future__ import annotations

import pytest

from conftest import SYNTH
from kdflow.flow import RecipeError
from kdflow.methods.recipe import resolve


def raw(method) -> dict:
    return {
        "data": SYNTH,
        "nodes": {"teacher": {"arch": "convnet_m", "checkpoint": "t.pt"}, "student": {"arch": "convnet_s"}},
        "method": method,
    }


def test_ft_after_a_method_whose_stages_win_is_rejected() -> None:
    with pytest.raises(RecipeError) as info:
        resolve(raw(["ab", "ft"]))  # AB's stages (init, main) win: FT's paraphrase stage is gone
    message = str(info.value)
    assert "\n" not in message
    assert "transfers.1: criterion 'ft' refers to stage 'paraphrase' (paraphrase_stage) which the recipe does not have " \
           "(stages: init, main)" in message


def test_an_explicit_stage_name_is_checked_too() -> None:
    recipe = raw(None)
    recipe.pop("method")
    recipe["transfers"] = [{"from": "teacher.stage2", "to": "student.stage2", "criterion": "ft", "paraphrase_stage": "pre"}]
    with pytest.raises(RecipeError, match=r"transfers\.0: criterion 'ft' refers to stage 'pre' .*\(stages: main\)$"):
        resolve(recipe)
    recipe["stages"] = [{"name": "pre", "epochs": 1}, {"name": "main"}]
    assert [s.name for s in resolve(recipe).resolved_stages()] == ["pre", "main"]


def test_ft_first_keeps_its_stage() -> None:
    recipe = resolve(raw(["ft", "kd"]))
    assert [s.name for s in recipe.resolved_stages()] == ["paraphrase", "main"]
