"""The submitit executor: resource mapping, the in-job command's stop/requeue, and a workflow run through it.

A real SLURM run (every job through sbatch, a forced requeue, Ctrl-C cancelling) is in tests/test_slurm.py.
"""
import pickle
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
import submitit
import yaml
from snakemake_interface_common.exceptions import WorkflowError

from varkd import executor
from varkd.executor import ExecutorSettings, JobCommand, RequeueLimitError, job_parameters, parse_key_values

from tests.helpers import MINIATURE, merge, snakemake


def fake_job(**resources):
    return SimpleNamespace(resources=resources, threads=4, name="train_student")


def test_rule_resources_become_submitit_parameters():
    settings = ExecutorSettings(partition="gpu", account="proj", qos="high", signal_delay_s=90)
    params = job_parameters(fake_job(gpu=2, mem_mb=8192, runtime=240), settings)
    assert params["timeout_min"] == 240 and params["cpus_per_task"] == 4 and params["mem_gb"] == 8
    assert params["gpus_per_node"] == 2 and "slurm_gres" not in params
    assert (params["slurm_partition"], params["slurm_account"], params["slurm_qos"]) == ("gpu", "proj", "high")
    assert params["slurm_signal_delay_s"] == 90
    typed = job_parameters(fake_job(gpu=2, gpu_model="h100"), ExecutorSettings(gpu_type="a100"))
    assert typed["slurm_gres"] == "gpu:h100:2" and "gpus_per_node" not in typed  # the rule's model wins
    assert job_parameters(fake_job(gpu=1), ExecutorSettings(gpu_type="a100"))["slurm_gres"] == "gpu:a100:1"
    cpu_only = job_parameters(fake_job(), ExecutorSettings())
    assert "gpus_per_node" not in cpu_only and "slurm_partition" not in cpu_only
    extra = job_parameters(fake_job(), ExecutorSettings(additional_parameters="constraint=a100, exclusive=true"))
    assert extra["slurm_additional_parameters"] == {"constraint": "a100", "exclusive": True}
    # every key is one submitit accepts (a misspelt one would raise NameError at submission)
    for key in {**params, **typed, **extra}:
        if key.startswith("slurm_"):
            assert key.removeprefix("slurm_") in submitit.SlurmExecutor._valid_parameters(), key
        else:
            assert key in submitit.AutoExecutor._valid_parameters(), key
    submitit.AutoExecutor(folder="/tmp/unused", cluster="local").update_parameters(**{**params, **typed, **extra})


def test_a_rules_slurm_resources_win_over_the_profile_and_unknown_ones_are_named():
    """Per-rule partition, account, QOS, constraint and sbatch options, named as snakemake-executor-plugin-slurm
    names them (the study's resources.<rule> or --set-resources <rule>:<name>=<value>); they were ignored."""
    settings = ExecutorSettings(partition="gpu", account="proj", qos="normal", additional_parameters="exclusive=true")
    params = job_parameters(fake_job(slurm_partition="cpu", slurm_account="other", qos="long", constraint="a100",
                                     cpus_per_task=16, slurm_extra="--mail-type=END --requeue", tmpdir="/tmp",
                                     _cores=4, _nodes=1, mem_mib=3815, disk_mb=1000), settings)
    assert (params["slurm_partition"], params["slurm_account"], params["slurm_qos"]) == ("cpu", "other", "long")
    assert params["slurm_constraint"] == "a100" and params["cpus_per_task"] == 16
    assert params["slurm_additional_parameters"] == {"exclusive": True, "mail_type": "END", "requeue": True}
    assert job_parameters(fake_job(), settings)["slurm_partition"] == "gpu"  # the profile's, for other rules
    for key in params:
        if key.startswith("slurm_"):
            assert key.removeprefix("slurm_") in submitit.SlurmExecutor._valid_parameters(), key
    with pytest.raises(WorkflowError, match=r"rule train_student: unknown resource\(s\) \['slurm_partiton'\]"):
        job_parameters(fake_job(slurm_partiton="cpu"), settings)
    with pytest.raises(WorkflowError, match="slurm_extra: expected sbatch options --name"):
        job_parameters(fake_job(slurm_extra="exclusive"), settings)


def test_ctrl_c_during_a_status_check_cancels_every_unfinished_job():
    """Snakemake takes the active jobs out of its list while it checks their status (a sacct call, seconds on a
    busy cluster) and cancels only those in the list on Ctrl-C: the executor cancels every job it submitted that
    it has not seen end, whatever Snakemake's list holds at that moment (CI once left a training job running)."""
    cancelled = []
    job = SimpleNamespace(cancel=lambda check: cancelled.append(check))
    ex = object.__new__(executor.Executor)
    ex.unfinished, ex.logger = {"99": job}, SimpleNamespace(info=lambda message: None)
    ex.cancel_jobs([])  # the status check holds the job
    assert cancelled == [False]


def test_bad_additional_parameters_are_named():
    with pytest.raises(WorkflowError, match="exclusive"):
        parse_key_values("constraint=a100,exclusive")


def test_missing_accounting_is_reported_at_start(monkeypatch):
    monkeypatch.setattr(executor.shutil, "which", lambda name: None)
    with pytest.raises(WorkflowError, match="sacct"):
        executor.check_accounting()
    monkeypatch.setattr(executor.shutil, "which", lambda name: "/usr/bin/sacct")
    disabled = subprocess.CompletedProcess([], 1, "", "Slurm accounting storage is disabled")
    monkeypatch.setattr(executor.subprocess, "run", lambda *a, **k: disabled)
    with pytest.raises(WorkflowError, match="accounting storage is disabled"):
        executor.check_accounting()


def test_command_failure_raises_with_its_status():
    JobCommand("true", max_requeues=1, stop_grace_s=5)()
    with pytest.raises(RuntimeError, match="status 3"):
        JobCommand("exit 3", max_requeues=1, stop_grace_s=5)()


@pytest.fixture
def usr2_handler():
    """checkpoint() ignores further USR2 signals (the job is ending); keep that out of the test process."""
    handler = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, handler)


def run_in_thread(command: JobCommand) -> threading.Thread:
    """The command as submitit runs it, with checkpoint() left to the test (submitit calls it on USR2)."""

    def run():
        try:
            command()
        except Exception:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while command._process is None:
        time.sleep(0.01)
    time.sleep(0.3)  # let bash install its trap
    return thread


def test_checkpoint_stops_the_command_then_requeues_it_until_the_limit(tmp_path, usr2_handler):
    """What submitit does on SLURM's USR2: checkpoint() stops the command (TERM to its group) and requeues."""
    marker = tmp_path / "stopped"
    script = f"trap 'echo TERM > {marker}; exit 143' TERM; sleep 30 & wait"
    command = JobCommand(script, max_requeues=1, stop_grace_s=10)
    thread = run_in_thread(command)
    start = time.perf_counter()
    delayed = command.checkpoint()
    thread.join(5)
    assert marker.read_text() == "TERM\n" and time.perf_counter() - start < 5
    assert not executor._group_alive(command._process.pid)  # the whole group, `sleep` included
    requeued = pickle.loads(pickle.dumps(delayed.function))  # travels without the old process
    assert requeued.requeues == 1 and requeued.command == script and requeued._process is None

    thread = run_in_thread(requeued)
    with pytest.raises(RequeueLimitError, match="after 1 requeues"):
        requeued.checkpoint()
    thread.join(5)
    assert not executor._group_alive(requeued._process.pid)  # stopped before failing


def test_command_that_ignores_term_is_killed_after_the_grace_period(usr2_handler):
    command = JobCommand("trap '' TERM; sleep 30", max_requeues=2, stop_grace_s=1)
    thread = run_in_thread(command)
    start = time.perf_counter()
    command.checkpoint()
    thread.join(5)
    assert not executor._group_alive(command._process.pid) and time.perf_counter() - start < 5


@pytest.mark.slow
def test_workflow_through_the_local_submitit_executor(presets):
    """The executor's own path without SLURM: submitit's local executor, one folder of logs per rule and run."""
    workdir = presets.parent
    (presets / "config.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load((presets / "config.yaml").read_text()),
                                                              MINIATURE)))
    target = "results/embedded/data/codes/val/codes.npy"
    local = ("--executor", "submitit", "--submitit-cluster", "local", "--jobs", "2", "--seconds-between-status-checks",
             "1")
    snakemake(workdir, *local, target)
    assert (workdir / target).is_file()
    logs = workdir / "results" / "logs" / "slurm"
    for rule in ("prepare_data", "train_tokenizer", "extract_codes"):
        folder = logs / rule / "embedded"  # <rule>/<wildcard values>
        assert list(folder.glob("*_log.out")), rule
        assert list(folder.glob("*_result.pkl")), rule

    # a failing job is reported with the paths of its logs, after --retries resubmitted it
    (workdir / "results" / "embedded" / "data" / "tokenizer" / "tokenizer.pt").write_bytes(b"not a checkpoint")
    (workdir / target).unlink()
    result = snakemake(workdir, *local, "--retries", "1", target, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "tokenizer.pt" in out and str(logs / "extract_codes" / "embedded") in out
    assert len(list((logs / "extract_codes" / "embedded").glob("*_submitted.pkl"))) == 1 + 2  # first run + 2 tries
