"""Bring your own loop: Hugging Face Trainer and Lightning drive α through blendq's
callbacks; STE/LSQ models are quantized from the first forward."""

import copy

import pytest
import torch
from conftest import small_cnn

import blendq
from blendq.integrations import AlphaWindow


def test_ste_and_lsq_quantize_from_the_first_forward_and_convert_as_they_are():
    for method in ("ste", "lsq"):
        torch.manual_seed(0)
        model = blendq.prepare(small_cnn(), blendq.QuantPolicy(
            w_bits=4, a_bits=8, method=method, act_method=method))
        x = torch.randn(8, 3, 8, 8)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(5):  # the probe: a few plain Adam steps, α never touched
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert blendq.transform.get_alpha(model) == 1.0
        with torch.no_grad():
            assert torch.equal(blendq.convert(model)(x), model.eval()(x))


def test_ab_starts_at_alpha_zero():
    model = blendq.prepare(small_cnn(), blendq.QuantPolicy(method="ab"))
    assert blendq.transform.get_alpha(model) == 0.0


def test_window_is_checked_when_constructed_and_bound():
    for bad in ((0.5, 0.2), (-0.1, 1.0), (0.0, 1.5), "x"):
        with pytest.raises(ValueError, match="window"):
            AlphaWindow(bad)
    with pytest.raises(ValueError, match="no blendq layers"):
        AlphaWindow().bind(small_cnn(), 10)
    prepared = blendq.prepare(small_cnn(), blendq.QuantPolicy())
    with pytest.raises(ValueError, match="max_steps"):
        AlphaWindow().bind(prepared, float("inf"))
    window = AlphaWindow((0.0, 0.5)).bind(prepared, 10)
    assert window.steps(10) == (0, 5)
    assert [window.step(s) for s in (0, 5, 9)] == [0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------
# Hugging Face Trainer


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    return blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _hf_trainer(model, out, max_steps=8, **kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from blendq.integrations import HuggingFaceCallback

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=2, save_steps=4, report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, **kw)
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                callbacks=[HuggingFaceCallback(window=(0.0, 0.5))])


def test_hugging_face_trainer_drives_alpha_logs_it_and_resumes_exactly(tmp_path):
    model = _bert()
    trainer = _hf_trainer(model, tmp_path / "full")
    trainer.train()
    assert blendq.transform.get_alpha(model) == 1.0
    alphas = [r["alpha"] for r in trainer.state.log_history if "alpha" in r]
    assert alphas and alphas[0] < 1.0 and alphas[-1] == 1.0
    assert any("blendq/w_rel_dist" in r for r in trainer.state.log_history)
    x = torch.randint(1, 64, (4, 12))
    converted = blendq.convert(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(converted(input_ids=x).logits, model.eval()(input_ids=x).logits)
    resumed_model = _bert()
    resumed = _hf_trainer(resumed_model, tmp_path / "full")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    full, again = model.state_dict(), resumed_model.state_dict()
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_hugging_face_callback_refuses_a_model_without_blendq_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     num_labels=3)
    trainer = _hf_trainer(transformers.BertForSequenceClassification(config), tmp_path)
    with pytest.raises(ValueError, match="no blendq layers"):
        trainer.train()


# ---------------------------------------------------------------------------
# Lightning


def _lightning_module(lightning):
    from trainer_ddp import lightning_module

    return lightning_module()


def _loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=g),
                                          torch.randint(0, 10, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _pl_trainer(lightning, out, epochs, **kw):
    from blendq.integrations import LightningCallback

    checkpoints = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(out),
                                                              save_top_k=-1)
    return lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1,
                             default_root_dir=str(out), logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[LightningCallback(window=(0.0, 0.5)), checkpoints],
                             **kw)


def test_lightning_trainer_drives_alpha_logs_it_and_resumes_exactly(tmp_path):
    lightning = pytest.importorskip("lightning")
    module = _lightning_module(lightning)
    trainer = _pl_trainer(lightning, tmp_path, 2)
    trainer.fit(module, _loader())
    assert blendq.transform.get_alpha(module.net) == 1.0
    assert trainer.callback_metrics["alpha"] == 1.0
    assert "blendq/w_rel_dist" in trainer.callback_metrics
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(blendq.convert(copy.deepcopy(module.net))(x), module.net.eval()(x))
    # the same run resumed in a new trainer from its checkpoint after the first epoch
    again = _lightning_module(lightning)
    first_epoch = sorted(tmp_path.glob("epoch=0*.ckpt"))[0]
    _pl_trainer(lightning, tmp_path / "resumed", 2).fit(again, _loader(),
                                                        ckpt_path=str(first_epoch))
    full, resumed = module.state_dict(), again.state_dict()
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_lightning_callback_refuses_a_module_without_blendq_layers(tmp_path):
    lightning = pytest.importorskip("lightning")
    module = _lightning_module(lightning)
    module.net = small_cnn()
    with pytest.raises(ValueError, match="no blendq layers"):
        _pl_trainer(lightning, tmp_path, 1).fit(module, _loader())


# ---------------------------------------------------------------------------
# Two processes through each trainer's own launcher


@pytest.mark.parametrize("trainer", ["lightning", "hf"])
def test_ddp_through_the_trainers_own_launcher_reduces_activation_scales(trainer, tmp_path):
    """Two CPU ranks (gloo) train on different halves of the data; the activation
    scales are averaged over the ranks each step, as in blendq's own engine, so they end
    equal on both ranks, as the parameters do, and α reaches 1 on both."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("lightning" if trainer == "lightning" else "transformers")
    script = Path(__file__).parent / "trainer_ddp.py"
    launch = [sys.executable, str(script)] if trainer == "lightning" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, trainer, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"{trainer}_rank{r}.pt") for r in (0, 1)]
    assert [r["alpha"] for r in ranks] == [1.0, 1.0]
    assert ranks[0]["scales"] and all(
        torch.equal(a, b) for a, b in zip(ranks[0]["scales"], ranks[1]["scales"], strict=True))
    assert ranks[0]["params"].keys() == ranks[1]["params"].keys()
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k])
               for k in ranks[0]["params"])
