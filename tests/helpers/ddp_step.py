"""One DDP training step, run by tests/test_training.py under torchrun (gloo, CPU).

Writes rank 0's gradients (after DDP's averaging) to ARGV[1]. Noise is fixed at zero and the
content augmentation is a reversal, so a single process can compute the same step.
"""
import sys

import torch
import torch.distributed as dist

import cdsvae


def make_batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 6, generator=generator)
    return x, x + 0.1 * torch.randn(8, 5, 6, generator=generator)


def make_model():
    torch.manual_seed(0)
    cfg = cdsvae.Config(frame_shape=(6,), static_dim=4, dynamic_dim=3, feature_dim=8, hidden_dim=10,
                        mlp_width=12, dataset_size=100)
    return cdsvae.CDSVAE(cfg)


def deterministic():
    cdsvae.CDSVAE.noise = staticmethod(lambda shape, like: torch.zeros(shape, dtype=like.dtype))
    cdsvae.content_order = lambda batch, frames, device=None, generator=None: \
        torch.arange(frames - 1, -1, -1).expand(batch, frames)


if __name__ == "__main__":
    deterministic()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    net = torch.nn.parallel.DistributedDataParallel(model)
    x, views = make_batch()
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss, _ = net(x[local], views[local])
    loss.backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, sys.argv[1])
    del net                      # DDP's reducer and its hooks go before the group they use
    dist.barrier()               # both ranks done: nothing in flight when the group is torn down
    dist.destroy_process_group()
