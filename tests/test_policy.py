import pytest
from conftest import small_cnn

import blendq
from blendq import QuantPolicy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"w_bits": 0}, r"w_bits must be an integer in 1..8, got 0"),
        ({"w_bits": 9}, r"w_bits must be an integer in 1..8, got 9"),
        ({"a_bits": 9}, r"a_bits must be an integer in 1..8 or None, got 9"),
        ({"w_bits": True}, r"w_bits must be an integer"),
        ({"method": "sgd"}, r"method must be one of \('ab', 'ste', 'lsq'\), got 'sgd'"),
        ({"act_method": "x"}, r"act_method must be one of"),
        ({"first_layer": (8, 9)}, r"first_layer\[1\] \(a_bits\) must be"),
        ({"last_layer": (1, 2, 3)}, r"last_layer must be bits or \(w_bits, a_bits\)"),
        ({"overrides": {"0": 12}}, r"overrides\['0'\]\[0\] \(w_bits\) must be"),
        ({"skip": "0"}, r"skip must be a sequence"),
        ({"quant_every": 0}, r"quant_every must be an integer >= 1, got 0"),
    ],
)
def test_invalid_policy_names_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantPolicy(**kwargs)


def test_policy_is_frozen():
    p = QuantPolicy()
    with pytest.raises(AttributeError):
        p.w_bits = 4


def test_rules_first_depthwise_last_and_overrides():
    model = small_cnn()
    plans = {
        p.name: p
        for p in QuantPolicy(
            w_bits=4,
            a_bits=4,
            first_layer=8,
            depthwise=(8, 8),
            last_layer=(8, None),
            overrides={"6": (2, 3)},
        ).resolve(model)
    }
    assert (plans["0"].w_spec.bits, plans["0"].a_spec.bits) == (8, 8)
    assert (plans["3"].w_spec.bits, plans["3"].a_spec.bits) == (8, 8)  # depthwise
    assert (plans["6"].w_spec.bits, plans["6"].a_spec.bits) == (2, 3)  # grouped, override
    assert plans["10"].w_spec.bits == 8 and plans["10"].a_spec is None


def test_patterns_that_match_nothing_are_errors():
    with pytest.raises(ValueError, match=r"overrides pattern 'head\*' matches no layer"):
        blendq.prepare(small_cnn(), QuantPolicy(overrides={"head*": 8}))
    with pytest.raises(ValueError, match=r"skip pattern 'fc' matches no layer"):
        blendq.prepare(small_cnn(), QuantPolicy(skip=["fc"]))


def test_depthwise_rule_without_depthwise_layer_is_error():
    from torch import nn

    with pytest.raises(ValueError, match="depthwise=.* matches no layer"):
        QuantPolicy(depthwise=8).resolve(nn.Sequential(nn.Linear(2, 2)))


def test_model_without_quantizable_layers():
    from torch import nn

    with pytest.raises(ValueError, match="no Linear, convolution"):
        blendq.prepare(nn.Sequential(nn.ReLU()), QuantPolicy())
