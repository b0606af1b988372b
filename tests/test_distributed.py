"""Training at scale: gradient accumulation, DDP ranks (gloo on the CPU), their agreed stop and exact resume, and
finding the ranks that torchrun or srun started."""
import csv
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from varkd import cli, distributed
from varkd.config import ConfigError, OptimConfig, to_yaml
from varkd.models.gpt import GPTConfig
from varkd.steps.train import train_gpt

from tests.helpers import DETERMINISTIC, REPO, job

STILL = GPTConfig(**DETERMINISTIC)
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                  "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_ARRAY_JOB_ID",
                  "SLURM_ARRAY_TASK_ID", "SUBMITIT_EXECUTOR")


def optim(**kw) -> OptimConfig:
    return OptimConfig(**{"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every": 4,
                          "log_every": 1, "precision": "fp32", **kw})


def write_job(train_job, path) -> str:
    path.write_text(to_yaml(train_job))
    return str(path)


def train_ranks(config: str, nproc: int = 2) -> int:
    return cli.main(["train", config, "--nproc", str(nproc), "--device", "cpu", "--threads", "1"])


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def log_rows(out) -> list[dict]:
    return list(csv.DictReader(open(out / "train_log.csv")))


def assert_close_weights(got: dict, expected: dict) -> None:
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=lambda m: f"{key}: {m}")


def test_grad_accumulation_equals_one_big_batch(codes, tmp_path):
    whole = train_gpt(job(codes, tmp_path / "whole", model=STILL, optim=optim()))
    micro = train_gpt(job(codes, tmp_path / "micro", model=STILL, optim=optim(grad_accum=2)))
    assert_close_weights(weights(micro), weights(whole))
    for x, y in zip(log_rows(tmp_path / "whole"), log_rows(tmp_path / "micro")):
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), abs=1e-5)
    assert torch.load(micro, weights_only=True)["train"]["student_forwards"] == 2 * 6  # one per micro-batch


@pytest.mark.slow
def test_ddp_ranks_train_like_one_process_and_rank_0_alone_writes(codes, tmp_path):
    single = train_gpt(job(codes, tmp_path / "single", model=STILL, optim=optim()))
    out = tmp_path / "ddp"
    config = write_job(job(codes, out, model=STILL, optim=optim(grad_accum=2)), tmp_path / "ddp.yaml")
    assert train_ranks(config) == 0  # 2 ranks x 2 micro-batches of 2 sequences
    assert_close_weights(weights(out / "student.pt"), weights(single))
    assert sorted(p.name for p in out.iterdir()) == ["student.pt", "train_log.csv"]  # no checkpoint, no temp file
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)]  # one writer
    for x, y in zip(log_rows(tmp_path / "single"), rows):  # losses averaged over the ranks
        assert float(y["loss"]) == pytest.approx(float(x["loss"]), abs=1e-5)
    summary = torch.load(out / "student.pt", weights_only=True)["train"]
    assert summary["student_forwards"] == 4 * 6 and "val_nll" in summary  # summed over ranks; rank 0 validates


RANK_SCRIPT = """
import os, signal, sys
from varkd import cli, sources

real, calls = sources.drop_labels, [0]

def drop_labels(*args):  # rank 1 alone gets a SIGTERM, in step 6
    calls[0] += 1
    if calls[0] == 6 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)

sources.drop_labels = drop_labels
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_at_one_step_and_the_resumed_run_is_exact(codes, tmp_path):
    """torchrun-style ranks (as srun or torchrun would start them) stop together; a --nproc rerun resumes them."""
    straight = tmp_path / "straight"
    assert train_ranks(write_job(job(codes, straight), tmp_path / "straight.yaml")) == 0

    out = tmp_path / "run"
    config = write_job(job(codes, out), tmp_path / "run.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, "train", config, "--device", "cpu", "--threads", "1"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    assert [p.wait(timeout=300) for p in ranks] == [143, 143]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 6 and len(saved["ranks"]) == 2  # not 4: the stop was agreed after step 6
    assert not (out / "student.pt").exists()

    assert train_ranks(config) == 0
    a, b = weights(straight / "student.pt"), weights(out / "student.pt")
    for key in a:  # dropout and label dropout included: each rank's random state was checkpointed
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in log_rows(out)] == [r["loss"] for r in log_rows(straight)]


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_its_ranks(codes, tmp_path):
    """`kill <varkd train --nproc 2>`: the ranks checkpoint the same step and the command exits as interrupted."""
    out = tmp_path / "run"
    config = write_job(job(codes, out, steps=400, optim=optim(steps=400, checkpoint_every=1000)), tmp_path / "run.yaml")
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    launcher = subprocess.Popen([sys.executable, "-m", "varkd.cli", "train", config, "--nproc", "2", "--device", "cpu",
                                 "--threads", "1"], env=env)
    deadline = time.monotonic() + 120
    while not ((out / "train_log.csv").exists() and len(log_rows(out)) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == 143
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= step < 400 and [r["step"] for r in log_rows(out)] == [str(s) for s in range(1, step + 1)]


def test_a_batch_that_does_not_split_is_refused_before_any_work(codes, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"optim.batch_size=8 .* optim.grad_accum=3 .* world size 1"):
        train_gpt(job(codes, tmp_path / "a", optim=optim(grad_accum=3)))
    assert not (tmp_path / "a").exists()
    config = write_job(job(codes, tmp_path / "b", optim=optim()), tmp_path / "b.yaml")
    assert train_ranks(config, nproc=3) == 2  # refused before the ranks start
    assert "optim.batch_size=8" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.fixture
def no_ranks(monkeypatch):
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_ranks_from_torchrun_variables(no_ranks):
    assert distributed.environment() is None
    for key, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="1234").items():
        no_ranks.setenv(key, value)
    assert distributed.environment() == distributed.Ranks(3, 8, 1, "node7", 1234)
    no_ranks.setenv("WORLD_SIZE", "1")
    assert distributed.environment() is None


def test_ranks_from_slurm_variables_as_submitit_reads_them(no_ranks):
    for key, value in dict(SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_JOB_NUM_NODES="3",
                           SLURM_JOB_NODELIST="gpu[03-04],cpu1", SLURM_JOB_ID="4242").items():
        no_ranks.setenv(key, value)
    ranks = distributed.environment()
    assert ranks == distributed.Ranks(5, 8, 1, "gpu03", random.Random("4242").randint(20000, 60000))
    from submitit.helpers import TorchDistributedEnvironment

    no_ranks.setenv("SUBMITIT_EXECUTOR", "slurm")  # inside a submitit job: submitit's own reading agrees
    theirs = TorchDistributedEnvironment()
    assert ranks == distributed.Ranks(theirs.rank, theirs.world_size, theirs.local_rank, theirs.master_addr,
                                      theirs.master_port)
    no_ranks.setenv("SLURM_NTASKS", "1")  # the executor's one task per job: not distributed
    assert distributed.environment() is None
