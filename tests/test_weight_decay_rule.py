"""`pstar train`'s optimizer groups: weight decay on matrices and embeddings only (nanoGPT's rule), or
on every parameter with `train.weight_decay_on: all`."""

import torch

import models
from pstar_cli.config import load_config
from pstar_cli.training.run import param_groups_of

TINY = "configs/tiny.yaml"


def meta_model(cfg):
    with torch.device("meta"):
        return models.build_model(cfg.model_dict())


def test_default_decays_tensors_of_two_or_more_dims_only():
    cfg = load_config(TINY)
    model = meta_model(cfg)
    decay, no_decay = param_groups_of(cfg)(model)
    assert decay["weight_decay"] == cfg.engine_config.optimizer.weight_decay == 0.1
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert any("wte" in n for n in decayed)  # the (tied) embedding is a matrix: decayed
    assert any(n.endswith("bias") for n in map(names.get, map(id, no_decay["params"])))
    # every trainable parameter in exactly one group
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_all_is_one_group_with_the_configs_decay():
    cfg = load_config(TINY, ["train.weight_decay_on=all"])
    assert param_groups_of(cfg) is None  # the engine's single group from engine.optimizer.params


def test_a_misspelt_rule_is_refused_with_the_choices():
    import pytest

    from pstar_cli.errors import PstarError

    with pytest.raises(PstarError) as error:
        load_config(TINY, ["train.weight_decay_on=matrix"])
    assert "weight_decay_on" in str(error.value) and "matrices" in str(error.value)
