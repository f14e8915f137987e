"""Run by tests/test_distributed_fsdp.py under torchrun: a prepared model trained under
FSDP2 (``fully_shard``, gloo), checkpointed and resumed through torch.distributed.checkpoint,
then gathered and converted; each rank saves what the test compares."""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

import blendq

out, method = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
POLICY = blendq.QuantPolicy(w_bits=4, a_bits=8, per_channel=True, method=method,
                            act_method="lsq" if method == "lsq" else "ste")
STEPS = 6


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    return blendq.prepare(model, POLICY)


def shard(model: nn.Module) -> nn.Module:
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    return fully_shard(model)


def train(model, controller, steps):
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(rank)
    for step in steps:
        controller.step(step)
        x = torch.randn(8, 16, generator=g) * (1 + rank)  # the ranks see other data
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


model = build()
controller = blendq.AlphaController(model, blendq.cubic(0, STEPS - 1))  # before sharding
shard(model)
train(model, controller, range(STEPS))
x = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
model.eval()
with torch.no_grad():
    trained = model(x)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
# checkpoint (sharded) and resume into a fresh prepared, sharded model
dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "dcp"))
again = shard(build())
state = get_model_state_dict(again)
dcp.load(state, checkpoint_id=str(out / "dcp"))
set_model_state_dict(again, state)
again.eval()
with torch.no_grad():
    resumed = again(x)
# gathered on one process: convert computes what the sharded model computed
plain = build()
plain.load_state_dict(full)
converted = blendq.convert(plain)
with torch.no_grad():
    deployed = converted(x)
torch.save({"trained": trained, "resumed": resumed, "deployed": deployed,
            "alpha": blendq.transform.get_alpha(plain),
            "scales": [q.scale.clone() for q in blendq.transform._act_quantizers(plain)],
            "full": full}, out / f"rank{rank}.pt")
dist.barrier()
time.sleep(0.5)
dist.destroy_process_group()
