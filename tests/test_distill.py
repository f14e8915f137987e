"""Distillation from the float model: the loss, the frozen teacher, and the engine, the
Hugging Face Trainer and Lightning using them."""

import copy
import json

import pytest
import torch
from conftest import small_cnn
from torch import nn

import blendq
from blendq.distill import Teacher, distillation_loss, kd_loss


def test_kd_loss_is_zero_for_the_teacher_itself_and_the_temperature_scaled_kl_otherwise():
    torch.manual_seed(0)
    t = torch.randn(6, 5)
    assert float(kd_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(6, 5, requires_grad=True)
    p = torch.softmax(t / 3, -1)
    expected = (p * (p.log() - torch.log_softmax(s / 3, -1))).sum(-1).mean() * 9
    assert torch.allclose(kd_loss(s, t, 3.0), expected, atol=1e-6)
    kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # a sequence model: every token one position
    seq = torch.randn(2, 4, 7)
    assert torch.allclose(kd_loss(seq, seq.flip(1)), kd_loss(seq.reshape(8, 7),
                                                             seq.flip(1).reshape(8, 7)))
    task = torch.tensor(2.0)
    assert float(distillation_loss(task, t, t, weight=0.25)) == pytest.approx(1.5, abs=1e-6)
    with pytest.raises(ValueError, match=r"student logits \(6, 5\), teacher logits \(6, 7\)"):
        kd_loss(torch.randn(6, 5), torch.randn(6, 7))
    with pytest.raises(ValueError, match="weight must be in"):
        distillation_loss(task, t, t, weight=1.5)


def test_the_teacher_stays_frozen_in_eval_mode_and_refuses_a_quantized_model():
    model = small_cnn()
    teacher = Teacher(model, copy=True)
    student = blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=8))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 3, 8, 8))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="teacher is the float model"):
        Teacher(student)


def test_the_engine_distills_from_its_float_start(tmp_path):
    from blendq.engine import TrainConfig, train

    base = TrainConfig(model="digits_cnn", model_args={"width": 8}, data="digits",
                       epochs=1, batch_size=64, eval_views=False)
    train(base.replace(quantize=False), tmp_path / "fp", progress=False)
    with pytest.raises(ValueError, match="needs init_from"):
        base.replace(distill=0.5)
    runs = {}
    for weight in (None, 0.5):
        cfg = base.replace(w_bits=4, a_bits=4, method="ste", init_from=str(tmp_path / "fp"),
                           distill=weight)
        runs[weight] = train(cfg, tmp_path / f"q{weight}", progress=False).history[-1]
    assert runs[None]["train_loss"] != runs[0.5]["train_loss"]  # the loss it trained on
    saved = json.loads((tmp_path / "q0.5" / "config.json").read_text())
    assert saved["distill"] == 0.5 and saved["distill_temperature"] == 2.0


def test_hugging_face_distillation_trainer_learns_from_the_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_integrations import _Tokens

    from blendq.integrations import DistillationTrainer, HuggingFaceCallback

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    teacher = Teacher(model, copy=True)
    model = blendq.prepare(model, blendq.QuantPolicy(w_bits=4, a_bits=8, method="ste"))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
        learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, save_strategy="no")
    seen = []
    forward = teacher.model.forward
    teacher.model.forward = lambda *a, **k: seen.append(k) or forward(*a, **k)
    trainer = DistillationTrainer(model=model, args=args, train_dataset=_Tokens(),
                                  teacher=teacher, distill_weight=1.0,
                                  callbacks=[HuggingFaceCallback()])
    trainer.train()
    assert len(seen) == 4 and all("labels" not in k for k in seen)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(v >= 0 for v in losses)
    # weight 1: the loss is the distillation loss alone, which the labels do not move
    batch = {k: torch.stack([_Tokens()[i][k] for i in range(8)]) for k in ("input_ids",
                                                                           "labels")}
    model.eval()  # no dropout: the same student logits twice
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        student = model(input_ids=batch["input_ids"]).logits
        assert torch.allclose(loss, kd_loss(student, teacher(input_ids=batch["input_ids"])))
    other = transformers.BertForSequenceClassification(
        transformers.BertConfig(**{**config.to_dict(), "num_labels": 5}))
    bad = DistillationTrainer(model=model, args=args, train_dataset=_Tokens(),
                              teacher=Teacher(other))
    with pytest.raises(ValueError, match=r"student logits \(8, 3\), teacher logits \(8, 5\)"):
        bad.compute_loss(model, batch)


def test_lightning_module_distills_with_the_callback(tmp_path):
    lightning = pytest.importorskip("lightning")
    from blendq.integrations import LightningCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            net = small_cnn()
            self.teacher = Teacher(net, copy=True)
            self.net = blendq.prepare(net, blendq.QuantPolicy(w_bits=4, a_bits=8))
            self.kd = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            loss = distillation_loss(nn.functional.cross_entropy(logits, y), logits,
                                     self.teacher(x), weight=0.5)
            self.kd.append(float(kd_loss(logits, self.teacher(x))))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad],
                                   lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8, generator=g),
                                          torch.randint(0, 10, (32,), generator=g))
    module = Module()
    before = copy.deepcopy(module.teacher.state_dict())
    lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path),
                      callbacks=[LightningCallback()]).fit(
        module, torch.utils.data.DataLoader(data, batch_size=8))
    assert len(module.kd) == 4 and all(v > 0 for v in module.kd)  # batch vs running stats
    assert blendq.transform.get_alpha(module.net) == 1.0
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher never moved
    module.teacher.model.train()  # as a trainer restoring modes by attribute does
    module.teacher(torch.randn(2, 3, 8, 8))
    assert not module.teacher.model.training  # it answers in eval mode all the same


def test_distillation_trainer_scales_like_the_trainer_under_gradient_accumulation(tmp_path):
    """With weight 0 the DistillationTrainer is the plain Trainer: under gradient
    accumulation the same parameters after the same steps (its loss is divided by the
    accumulation steps, not left as if the model had normalised it)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from blendq.integrations import DistillationTrainer

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                  n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": i, "labels": i} for i in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=2, max_steps=2,
        per_device_train_batch_size=2, learning_rate=0.1, optim="sgd", report_to=[],
        use_cpu=True, seed=0, data_seed=0, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", max_grad_norm=0.0)  # no clipping: scale shows
    plain = transformers.Trainer(model=copy.deepcopy(model), args=args, train_dataset=data)
    plain.train()
    distil = DistillationTrainer(model=copy.deepcopy(model), args=args, train_dataset=data,
                                 teacher=Teacher(model, copy=True), distill_weight=0.0)
    distil.train()
    a, b = dict(plain.model.named_parameters()), dict(distil.model.named_parameters())
    moved = [n for n in a if not torch.equal(a[n], dict(model.named_parameters())[n])]
    assert moved
    assert all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a)
    # the distillation term alone: two micro-batches of 2 step as one batch of 4
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.lm_head.weight.mul_(0.5)  # not the teacher: a distillation loss to learn
    runs = []
    for accumulate, batch in ((2, 2), (1, 4)):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student), train_dataset=data, distill_weight=1.0,
            teacher=Teacher(model, copy=True),
            args=transformers.TrainingArguments(**{
                **args.to_dict(), "gradient_accumulation_steps": accumulate,
                "per_device_train_batch_size": batch, "output_dir": str(tmp_path)}))
        trainer.train()
        runs.append(dict(trainer.model.named_parameters()))
    assert all(torch.allclose(runs[0][n], runs[1][n], rtol=1e-4, atol=1e-6) for n in a)
    assert not torch.equal(runs[0]["transformer.h.0.mlp.c_fc.weight"],
                           student.transformer.h[0].mlp.c_fc.weight)
