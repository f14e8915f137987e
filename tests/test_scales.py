"""Scale sources: where a quantizer's scale comes from, apart from its method."""

import pickle

import pytest
import torch

import blendq
from blendq import scales
from blendq.functional import SCALES
from blendq.quantizers import ActQuantizer, ActSpec, WeightGroup, WeightQuantizer, WeightSpec


def test_each_spec_name_has_one_source_and_lsq_learns_from_it():
    assert tuple(scales.SOURCES) == SCALES
    with pytest.raises(ValueError, match="scale must be one of"):
        scales.get("absmax")
    for name in SCALES:
        w = WeightQuantizer(WeightSpec(bits=4, scale=name), torch.randn(8, 4))
        assert w.source is scales.get(name) and not w.source.learned
        lsq = WeightQuantizer(WeightSpec(bits=4, scale=name, method="lsq"), torch.randn(8, 4))
        assert lsq.source.learned and lsq.source.start is scales.get(name)
        a = ActQuantizer(ActSpec(bits=8, scale=name, method="lsq"))
        assert a.source.learned and hasattr(a, "step")
    ppq, ranges = scales.get("ppq"), scales.get("minmax")
    assert ppq.groups and ppq.defers and not ranges.groups and not ranges.defers


def test_sources_give_their_own_scales():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    for name in SCALES:
        q = WeightQuantizer(WeightSpec(bits=4, per_channel=True, scale=name), w).train()
        codes, scale = q.project(w)
        if name == "minmax":  # the largest magnitude onto the grid's end
            assert torch.allclose(scale.reshape(-1), w.abs().amax(1) / 7)
        else:  # least squares: no better than PPQ's own fixed point
            ref_codes, ref = blendq.functional.ppq(w, 4, axis=0, max_iter=q.spec.init_iter,
                                                   scale=blendq.functional.search_scale(
                                                       w, 4, axis=0), fixed=True)
            assert torch.equal(scale, ref) and torch.equal(codes, ref_codes)
    x = torch.rand(4, 3, 8, 8)
    ranges = scales.get("minmax").batch(x, 8, False, torch.ones(()), 3, None)
    assert torch.equal(ranges, x.max() / 255)
    batches = torch.tensor([1.0, 3.0, 2.0])
    assert scales.get("minmax").calibrated(batches) == 3.0
    assert scales.get("ppq").calibrated(batches) == 2.0


def test_grouping_and_deferral_follow_the_source():
    w = torch.randn(8, 16)
    assert WeightGroup.key(WeightQuantizer(WeightSpec(bits=4), w)) is not None
    assert WeightGroup.key(WeightQuantizer(WeightSpec(bits=4, scale="minmax"), w)) is None
    assert WeightGroup.key(WeightQuantizer(WeightSpec(bits=4, method="lsq"), w)) is None
    for name, defers in (("ppq", True), ("minmax", False)):
        a = ActQuantizer(ActSpec(bits=8, scale=name))
        blendq.quantizers.ActStatistics([a])
        assert a.defers_statistics(signed=False) is defers


def test_a_quantizer_pickled_before_sources_gets_its_own():
    a = ActQuantizer(ActSpec(bits=8, scale="minmax"))
    del a.__dict__["source"]  # as pickled by a version without sources
    again = pickle.loads(pickle.dumps(a))
    assert again.source is scales.get("minmax")
