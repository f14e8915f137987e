"""Two-process CPU training through a trainer's own launcher, with blendq's callback.

    python tests/trainer_ddp.py lightning OUT        # Lightning launches its ranks (ddp)
    python -m torch.distributed.run --nproc_per_node 2 tests/trainer_ddp.py hf OUT

Each rank writes ``OUT/<trainer>_rank<r>.pt``: α at the end, every activation
quantizer's EMA scale and the parameters (batch-norm statistics are each rank's own),
for ``tests/test_integrations.py`` to compare across ranks (the ranks train on different
halves of the data, so equal scales mean the scales were reduced over the ranks).
"""

import os
import sys
from pathlib import Path

import torch
from torch import nn

import blendq

sys.path.insert(0, str(Path(__file__).parent))
from conftest import small_cnn  # noqa: E402


def _state(model: nn.Module) -> dict:
    scales = [m.scale.clone() for m in model.modules()
              if isinstance(m, blendq.quantizers.ActQuantizer)]
    return {"alpha": blendq.transform.get_alpha(model), "scales": scales,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def lightning_module():
    """A LightningModule holding a prepared small CNN (also used by the one-process tests)."""
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = blendq.prepare(small_cnn(), blendq.QuantPolicy(w_bits=4, a_bits=8))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Module()


def _lightning(out: Path) -> None:
    import lightning

    from blendq.integrations import LightningCallback

    class Record(lightning.Callback):
        def on_train_end(self, trainer, module):
            torch.save(_state(module.net), out / f"lightning_rank{trainer.global_rank}.pt")

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=g) * 3,
                                          torch.randint(0, 10, (64,), generator=g))
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                                logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                default_root_dir=str(out),
                                callbacks=[LightningCallback(window=(0.0, 0.5)), Record()])
    trainer.fit(lightning_module(), torch.utils.data.DataLoader(data, batch_size=8))


def _hugging_face(out: Path) -> None:
    import transformers

    from blendq.integrations import HuggingFaceCallback

    transformers.utils.logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = blendq.prepare(transformers.BertForSequenceClassification(config),
                           blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (64, 12), generator=g)
    data = [{"input_ids": i, "labels": i[0] % 3} for i in ids]

    class Record(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            torch.save(_state(model), out / f"hf_rank{args.process_index}.pt")

    args = transformers.TrainingArguments(
        output_dir=str(out / "hf"), max_steps=6, per_device_train_batch_size=8,
        learning_rate=1e-3, report_to=[], use_cpu=True, ddp_backend="gloo", seed=0,
        disable_tqdm=True, save_strategy="steps", save_steps=3)  # rank 0 alone saves
    transformers.Trainer(model=model, args=args, train_dataset=data,
                         callbacks=[HuggingFaceCallback(window=(0.0, 0.5)), Record()]).train()


if __name__ == "__main__":
    torch.set_num_threads(1)
    which, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _lightning(out) if which == "lightning" else _hugging_face(out)
