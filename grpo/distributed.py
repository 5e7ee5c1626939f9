"""Data parallelism over processes: `torchrun --nproc_per_node=N -m grpo.train ...`.

The launcher (torchrun, or `accelerate launch`, which runs torchrun) starts N processes, the
ranks, and sets RANK, WORLD_SIZE, LOCAL_RANK; one process without them runs as before. Under
SLURM alone (`srun`, or `hydra/launcher=slurm` with `tasks_per_node` N) the same variables are
taken from SLURM's (`adopt_slurm`).
`trainer.batch_size` stays the global number of prompts per step. Each rank takes an equal share
of whole groups of every batch (`grpo.rollout.sampler`), generates, scores and trains on them,
so that N ranks make the update one process makes on the whole batch:
- the loss normalisers (completions, tokens) are summed over ranks
  (`grpo.actor.update.normalisers`): each rank's loss is its part of the global batch's
  loss, and the ranks' gradients are summed (`sum_gradients`; FSDP's reduce-scatter sums too),
  which gives the global loss's gradient;
- advantages and the logged numbers come from the global batch, gathered on every rank
  (`gather_batch`); evaluation is split over ranks and its records gathered
  (`grpo.evaluation.heldout`);
- rank 0 alone writes the run folder (logs, checkpoints, model); the other ranks log nothing.

`trainer.strategy`: `ddp` replicates the model on every rank and all-reduces the gradients
once per optimiser step, after the micro-batches (DDP's algorithm; torch's wrapper is not used
because `grpo.actor.logprobs.token_logprobs` calls the backbone and LM head directly, which the
wrapper would not see). `fsdp` shards each decoder layer's parameters, gradients and optimizer
state over ranks (FSDP2 `fully_shard`) during the update, and gathers the whole weights for
generation,
evaluation and saving (`gathered`), which must therefore fit one device; embeddings and LM head
stay replicated, so only LoRA adapters of the layers train, and FSDP runs keep no checkpoints
yet. The backend follows the device: nccl on CUDA, gloo on CPU. Every rank takes part in every
collective: the update runs the same micro-batches on all ranks, and generation runs on gathered
weights without collectives.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from grpo.batch import ScoredRollout, concat, take

T = TypeVar("T")


# torchrun's variables and the SLURM ones they are taken from when only SLURM started the
# processes (`srun`, or Hydra's submitit launcher with hydra.launcher.tasks_per_node > 1).
SLURM_VARIABLES = {
    "RANK": "SLURM_PROCID",
    "WORLD_SIZE": "SLURM_NTASKS",
    "LOCAL_RANK": "SLURM_LOCALID",
}


def adopt_slurm() -> None:
    """Under SLURM with several tasks and no launcher's RANK: RANK, WORLD_SIZE and LOCAL_RANK
    from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, the rendezvous (MASTER_ADDR) on the first
    host of SLURM_JOB_NODELIST and MASTER_PORT from the job id (unless set). Else nothing."""
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    for ours, theirs in SLURM_VARIABLES.items():
        env[ours] = env[theirs]
    env.setdefault("MASTER_ADDR", first_host(env["SLURM_JOB_NODELIST"]))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[003-005,9],cpu1` -> `gpu003`."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    prefix, _, rest = nodelist[:end].partition("[")
    if not rest:
        return prefix
    numbers, _, suffix = rest.partition("]")
    return prefix + numbers.split(",")[0].split("-")[0] + suffix


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without torchrun/accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str) -> str:
    """Join the other ranks when launched with several processes; returns this rank's device.

    CUDA: rank r uses GPU LOCAL_RANK and the nccl backend; CPU: gloo. The process group is
    destroyed at exit. One process: `device`, and nothing else happens.
    """
    if launched_world_size() == 1:
        return device
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(_leave)
    return device


def _leave() -> None:
    """Destroy the process group at exit, unless another user did (vLLM's engine does)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one that writes the run folder (and in a single process)."""
    return rank() == 0


def hydra_overrides() -> list[str]:
    """Command-line overrides for ranks other than 0: no run folder or log file of their own.

    Hydra makes a run folder in every process, named by the time it starts; ranks > 0 get a
    temporary one instead (removed at exit) and write into rank 0's (`share`).
    """
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    scratch = tempfile.mkdtemp(prefix=f"grpo-rank{os.environ['RANK']}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
        f"hydra.run.dir={scratch}",
        f"hydra.sweep.dir={scratch}",
    ]


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: dict[str, T]) -> dict[str, T]:
    """Each value summed over ranks (every rank passes the same keys), types kept."""
    if world_size() == 1:
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return {k: type(v)(x) for (k, v), x in zip(values.items(), total.tolist(), strict=True)}


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' values (e.g. a stop signal that reached only some ranks)."""
    if world_size() == 1:
        return value
    top = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return int(top.item())


def barrier() -> None:
    """Wait until every rank gets here (one process: nothing)."""
    if world_size() > 1:
        dist.barrier()


def share(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_then_share(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` run on rank 0 alone, its result (or its exception) on every rank."""
    if world_size() == 1:
        return fn(*args)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args)
        except Exception as e:  # raised on every rank below, so none waits forever
            error = e
    result, error = share((result, error))
    if error is not None:
        raise error
    return result


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects, CPU tensors)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def _to(value: Any, device: torch.device | str) -> Any:
    """`value` with its tensors (in dataclasses and dicts too) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if is_dataclass(value):
        return replace(
            value, **{f.name: _to(getattr(value, f.name), device) for f in fields(value)}
        )
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def gather_batch(batch: ScoredRollout) -> ScoredRollout:
    """The global batch: every rank's groups in rank order, the sampler's order (CPU tensors),
    with this rank's own generation and scoring times. One process: `batch` itself."""
    if world_size() == 1:
        return batch
    whole = concat(all_gather(_to(batch, "cpu")))
    whole.generate_s, whole.reward_s = batch.generate_s, batch.reward_s
    return whole


def my_part(batch: ScoredRollout, device: torch.device | str) -> ScoredRollout:
    """This rank's rows of the global batch (ranks hold equal, consecutive shares of whole
    groups), on `device`. One process: `batch` itself."""
    if world_size() == 1:
        return batch
    n = len(batch.rows) // world_size()
    return _to(take(batch, slice(rank() * n, (rank() + 1) * n)), device)


def my_rows(values: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global-batch tensor."""
    return values.chunk(world_size())[rank()]


def prepare(model: torch.nn.Module, strategy: str) -> None:
    """Make `model` data-parallel in place: rank 0's trainable weights on every rank (a seeded
    LoRA init differs by rank), and with `fsdp` its decoder layers sharded, and the rest of the
    model too (embeddings, final norm, LM head) when it trains (full fine-tuning). One process:
    no-op.
    """
    if world_size() == 1:
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param, src=0)
    if strategy == "fsdp":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        layers = set(getattr(base, "_no_split_modules", None) or [])  # decoder layer classes
        units = [m for m in model.modules() if type(m).__name__ in layers]
        if any(p.requires_grad and not sharded(p) for p in _outside(model, units)):
            units.append(model)  # full fine-tuning: the root unit holds the rest
        for module in units:
            # Resharded after every forward, also as roots: peft's disable_adapter (the
            # reference policy) then switches requires_grad of the sharded parameters.
            fully_shard(module, reshard_after_forward=True)
            module.set_gradient_divide_factor(1.0)  # sum the ranks' gradients
            module.set_force_sum_reduction_for_comms(True)  # (gloo has no pre-scaled sum)


def _outside(model: torch.nn.Module, units: list[torch.nn.Module]) -> list[torch.Tensor]:
    """The parameters of `model` that none of `units` holds."""
    inside = {id(p) for unit in units for p in unit.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def sharded(obj: torch.nn.Module | torch.Tensor) -> bool:
    """True for a tensor sharded by FSDP, or a model with FSDP-sharded parts."""
    if isinstance(obj, torch.Tensor):
        return isinstance(obj, DTensor)
    return any(isinstance(m, FSDPModule) for m in obj.modules())


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of replicated parameters over ranks, in place (no extra memory).

    Sharded (FSDP) parameters are left out: their reduce-scatter already summed them.
    """
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not sharded(p.grad)]
    for work in [dist.all_reduce(grad, async_op=True) for grad in grads]:
        work.wait()


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Within: an FSDP-sharded model holds its whole weights on every rank, as plain tensors.

    Generation, evaluation and saving run on them with no collective, so ranks may make
    different numbers of forward passes. No-op for a model that is not sharded, or whole
    already (nested: the outer one reshards).
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or not any(sharded(p) for p in model.parameters()):
        yield
        return
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """An FSDP-sharded model's state dict with whole tensors, for `save_pretrained(state_dict=)`
    (every rank must call it); None for a model that is not sharded (it saves its own)."""
    if not sharded(model):
        return None
    return {k: v.full_tensor() if sharded(v) else v for k, v in model.state_dict().items()}
