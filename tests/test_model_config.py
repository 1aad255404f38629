"""The typed model config: conf/model/sdxl.yaml's keys and defaults, unknown keys named, plain records."""

import functools
import io

import pytest
import torch
from omegaconf import OmegaConf

from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.models.config import LoRAConfig, ModelConfig
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection
from tdd_lightning.training.run import build_module
from tests.hydra_utils import CONF, compose_cfg


def module(model):
    return TDDModule(
        model=model,
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )


def test_defaults_are_the_ones_of_the_sdxl_yaml():
    sdxl = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "sdxl.yaml"))
    assert ModelConfig().to_dict() == sdxl
    assert list(ModelConfig().to_dict()) == list(sdxl)  # same keys, same order (what --cfg job shows)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"pretrained": "x", "lora_rank": 4}, "model.lora_rank"),
        ({"pretrained": "x", "lora": {"rank": 4, "dropout": 0.1}}, "model.lora.dropout"),
    ],
)
def test_an_unknown_key_is_an_error_naming_it(values, key):
    with pytest.raises(ConfigError) as e:
        module(values)
    assert e.value.key == key and key in str(e.value) and "known:" in str(e.value)


def test_a_partial_mapping_takes_the_defaults_and_records_plain_types():
    m = module({"pretrained": "some/folder", "lora": {"rank": 4}})
    assert m.model_config == ModelConfig(pretrained="some/folder", lora=LoRAConfig(rank=4))
    assert (
        m.hparams["model"]
        == m.model_cfg
        == ModelConfig(pretrained="some/folder", lora=LoRAConfig(rank=4)).to_dict()
    )
    assert m.hparams["model"]["lora"] == {"rank": 4, "alpha": None, "target_modules": None, "fused": True}
    buffer = io.BytesIO()
    torch.save(dict(m.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["model"] == m.model_cfg  # plain types only


def test_a_model_config_instance_is_used_as_is():
    config = ModelConfig(
        pretrained="p", base_dtype="bf16", lora=LoRAConfig(rank=2, alpha=8, target_modules=["to_q"])
    )
    m = module(config)
    assert m.model_config is config
    assert m.hparams["model"]["lora"] == {"rank": 2, "alpha": 8, "target_modules": ["to_q"], "fused": True}


@pytest.mark.parametrize("experiment", ["toy_tdd", "smoke", "sdxl_tdd"])
def test_the_recorded_model_is_the_composed_node(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
    m = build_module(cfg)
    assert m.hparams["model"] == OmegaConf.to_container(cfg.model, resolve=True)
    assert list(m.hparams["model"]) == list(cfg.model)


def test_an_unknown_model_key_stops_build_module_naming_it(tmp_path):
    cfg = compose_cfg(["+model.lora.droput=0.1"], tmp_path)
    with pytest.raises(UserError, match=r"model\.lora\.droput"):
        build_module(cfg)
