"""Data-parallel training over several processes (DDP): finding the ranks, starting them, and what they share.

Multi-GPU training is one Snakemake job, i.e. one command: the submitit executor keeps one task per SLURM job,
since Snakemake must run each job's command exactly once (several SLURM tasks would each run it, each writing
the job's outputs). The rule passes the job's GPU count as `varkd train job.yaml --nproc N`, and that command
starts N local ranks, one per GPU (`launch`). Ranks started by someone else are detected instead and --nproc is
then ignored: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or SLURM's when
`srun` started several tasks, e.g. over several nodes (SLURM_PROCID, SLURM_NTASKS > 1, SLURM_LOCALID; the master
is the first host of SLURM_JOB_NODELIST, the port derived from the job id), read as submitit's
TorchDistributedEnvironment does. (So a job of several tasks must start varkd through srun: SLURM_NTASKS > 1 in a
single process would wait for ranks that never come. The executor's jobs have one task, and --nproc decides.)
Every rank uses the GPU cuda:<local rank>; on a CPU the ranks talk over gloo (tests).

Between steps the ranks share little: a stop flag (a SIGTERM reaching any rank stops all of them at the same
step), logged values, and their random states for the checkpoint, which rank 0 alone writes.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process sits among the training processes, and where they meet."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def environment() -> Optional[Ranks]:
    """The ranks torchrun or srun started this process among; None for a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    elif int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        from submitit.slurm.slurm import SlurmJobEnvironment

        # submitit's TorchDistributedEnvironment asks submitit which executor runs it, so it fails in tasks srun
        # started outside submitit; its SLURM reader and its port rule work in both.
        job = SlurmJobEnvironment()
        port = int(env.get("MASTER_PORT") or random.Random(job.job_id).randint(20000, 60000))
        ranks = Ranks(job.global_rank, job.num_tasks, job.local_rank, job.hostnames[0], port)
    else:
        return None
    return ranks if ranks.world_size > 1 else None


@contextmanager
def process_group(ranks: Optional[Ranks], device: torch.device) -> Iterator[torch.device]:
    """Join the other ranks (no-op for a single process); yields this rank's device, cuda:<local rank> on GPUs."""
    if ranks is None:
        yield device
        return
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {ranks.local_rank} needs a GPU of its own, {torch.cuda.device_count()} are "
                             "visible: give --nproc at most the job's GPU count")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                            world_size=ranks.world_size,
                            init_method=f"tcp://{ranks.master_addr}:{ranks.master_port}")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def launch(nproc: int, main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run `main(argv)` as nproc local ranks and return its exit status (that of the first rank to fail).

    The caller's entry point (the CLI's `main`) is passed in, so that this module does not import the CLI above
    it; spawn pickles it by name, so it must be a module-level function. A SIGTERM to this process is passed on to
    the ranks, which checkpoint the same step and exit together.
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the ranks to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.start_processes(_run_rank, args=(nproc, port, main, argv), nprocs=nproc, join=False,
                               start_method="spawn")

    def forward(signum, frame):
        for pid in ranks.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while not ranks.join():
            pass
    except mp.ProcessExitedException as failed:
        return failed.exit_code if failed.exit_code > 0 else 128 - failed.exit_code  # killed by signal -code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


LAUNCHED = "VARKD_LAUNCHED"  # set in the ranks `launch` starts


def launched() -> bool:
    """This process is a rank that `launch` started (its launcher holds the job's lock)."""
    return os.environ.get(LAUNCHED) == "1"


def _run_rank(local_rank: int, nproc: int, port: int, main: Callable[[list[str]], int], argv: list[str]) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{LAUNCHED: "1"})
    sys.exit(main(argv))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any rank (every rank must call this at the same point)."""
    if world_size() == 1:
        return flags
    agreed = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return [bool(x) for x in agreed.tolist()]


def combine(logs: dict[str, float | int], device: torch.device) -> dict[str, float | int]:
    """Logged values over ranks: floats (losses of the rank's parts) averaged, ints (running counts) summed."""
    if world_size() == 1:
        return logs
    ints = [k for k, v in logs.items() if isinstance(v, int)]
    floats = [k for k in logs if k not in ints]
    means = torch.tensor([float(logs[k]) for k in floats], dtype=torch.float64, device=device)
    sums = torch.tensor([logs[k] for k in ints], dtype=torch.int64, device=device)
    dist.all_reduce(means)
    dist.all_reduce(sums)
    values = dict(zip(floats, (means / world_size()).tolist())) | dict(zip(ints, sums.tolist()))
    return {k: values[k] for k in logs}


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (picklable objects; CPU tensors)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
