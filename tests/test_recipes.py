"""Every bundled recipe runs at smoke size on tiny data in its real format, and the
rules it names (first, depthwise, last layer) find layers of its model."""

import pytest
from fake_datasets import make_cifar10, make_fashion_mnist, make_image_folder

import blendq
from blendq.data import load_dataset
from blendq.engine import TrainConfig, load_recipe, recipe_names, train
from blendq.engine.trainer import build, data_shape


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"cifar10": make_cifar10(root / "cifar", per_batch=4),
            "fashion-mnist": make_fashion_mnist(root / "fmnist", 16, 8),
            "imagenet": make_image_folder(root / "imagenet", classes=3, per_class=2)}


def _smoke(name: str, tiny) -> TrainConfig:
    values = load_recipe(name)
    cfg = TrainConfig.from_dict(values)
    changes = {"epochs": 1, "batch_size": 4, "train_subset": 8, "test_subset": 8,
               "device": "cpu", "workers": 0, "init_from": None}
    if cfg.data in tiny:
        changes["data_root"] = str(tiny[cfg.data])
    if cfg.data == "imagenet":
        changes["image_size"] = 32
    if "width" in cfg.model_args or cfg.model == "binarynet":  # same layers, fewer channels
        changes["model_args"] = {**cfg.model_args, "width": 0.25}
    return cfg.replace(**changes)


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_runs_at_smoke_size(name, tiny, tmp_path):
    cfg = _smoke(name, tiny)
    result = train(cfg, tmp_path, progress=False)
    row = result.history[-1]
    assert 0.0 <= row.get("q_test_acc", row["test_acc"]) <= 100.0
    if cfg.quantize:
        data = load_dataset(cfg.data, cfg.data_root)
        rows = blendq.summary(build(cfg, data_shape(cfg, data)))
        w_bits = [r.w_bits for r in rows if r.fate == "quantized"]
        if cfg.first_layer:
            assert w_bits[0] == cfg.first_layer[0]
        if cfg.last_layer:
            assert w_bits[-1] == cfg.last_layer[0]
        assert cfg.w_bits in w_bits


def test_variants_are_deltas():
    assert load_recipe("mobilenet_v1_imagenet_w4a4_pc") == {
        **load_recipe("mobilenet_v1_imagenet_w4a4"), "per_channel": True,
        "description": load_recipe("mobilenet_v1_imagenet_w4a4_pc")["description"]}
    assert load_recipe("binarynet_cifar10_ste")["method"] == "ste"
