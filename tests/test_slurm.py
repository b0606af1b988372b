"""`snakemake --profile slurm` on a real SLURM: every job through sbatch, a forced requeue, Ctrl-C cancelling.

Needs a SLURM with accounting. VARKD_TEST_SLURM=local starts a single-node one with .ci/local-slurm.sh (root on
Debian; CI does this) and stops it afterwards; VARKD_TEST_SLURM=cluster uses the SLURM this machine submits to
(its default partition, or SNAKEMAKE_SUBMITIT_PARTITION). Otherwise these tests are skipped.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import MINI_BACKBONE, MINIATURE, REPO, files_of, merge

pytestmark = pytest.mark.slow

LOCAL_RULES = {"all", "resolve_config", "aggregate", "plot"}
# The teacher trains long enough (a few seconds) to be caught mid-run and requeued.
TEACHER_STEPS = 600


@pytest.fixture(scope="module")
def slurm():
    mode = os.environ.get("VARKD_TEST_SLURM")
    script = ["bash", str(REPO / ".ci" / "local-slurm.sh")]
    if mode == "local":
        subprocess.run([*script, "start"], check=True, timeout=900)
        try:
            yield
        finally:
            subprocess.run([*script, "stop"], check=True, timeout=120)
    elif mode == "cluster":
        yield
    else:
        pytest.skip("no SLURM: set VARKD_TEST_SLURM=local (root on Debian: starts one here) or =cluster")


def miniature(presets: Path, teacher_steps: int = TEACHER_STEPS) -> Path:
    study = presets / "config.yaml"
    study.write_text(yaml.safe_dump(merge(yaml.safe_load(study.read_text()), MINIATURE)))
    backbone = presets / "backbones" / "tiny.yaml"
    teacher = {"teacher_optim": {"steps": teacher_steps, "checkpoint_every": 100, "log_every": 100}}
    backbone.write_text(yaml.safe_dump(merge(merge(yaml.safe_load(backbone.read_text()), MINI_BACKBONE), teacher)))
    return presets.parent


def slurm_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    """`snakemake --profile slurm` as a user types it in the repository root (the profile is ./slurm)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "--directory", str(workdir),
           "--seconds-between-status-checks", "2", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def our_jobs(workdir: Path) -> list[dict]:
    """SLURM's view (sacct) of the jobs submitted for this workdir, by the submitit folders they log to."""
    ids = sorted({p.name.split("_")[0] for p in (workdir / "results" / "logs" / "slurm").rglob("*_submitted.pkl")})
    if not ids:
        return []
    out = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2",
                          "--format=JobID,JobName,State,Partition", *[f"--jobs={i}" for i in ids]],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(("id", "name", "state", "partition"), line.split("|"))) for line in out.splitlines()]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_study_on_slurm_with_a_requeued_training_job(slurm, presets, miniature_files):
    """The miniature study through sbatch, its teacher requeued mid-training; the evaluate jobs on another partition
    (the study's resources.evaluate.slurm_partition), the sample jobs too (--set-resources, as a user types it)."""
    workdir = miniature(presets)
    study = presets / "config.yaml"
    study.write_text(yaml.safe_dump({**yaml.safe_load(study.read_text()),
                                     "resources": {"evaluate": {"slurm_partition": "cpu"}}}))
    run = slurm_snakemake(workdir, "all", "--set-resources", "sample:slurm_partition=cpu")
    teacher = workdir / "results" / "embedded" / "tiny" / "teacher"
    wait_for(lambda: (teacher / "checkpoint.pt").exists() or run.poll() is not None, 600, "the teacher's checkpoint")
    (job,) = [j for j in our_jobs(workdir) if j["name"] == "smk-train_teacher"]
    subprocess.run(["scancel", "--signal=USR2", job["id"]], check=True)  # what SLURM sends before a time limit
    out, _ = run.communicate(timeout=1200)
    assert run.returncode == 0, out[-5000:]

    log = (workdir / "results" / "logs" / "embedded" / "tiny" / "teacher" / "train.log").read_text()
    assert "resuming from" in log, log[-2000:]
    submitit_logs = "".join(p.read_text() for p in (workdir / "results" / "logs" / "slurm" / "train_teacher")
                            .rglob("*_log.*"))
    assert "Requeued job" in submitit_logs
    steps = [int(r.split(",")[0]) for r in (teacher / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(100, 601, 100))  # one row per logged step: nothing lost, nothing repeated

    # every job but the local ones went through sbatch and completed
    jobs = our_jobs(workdir)
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    moved = {"smk-evaluate", "smk-sample"}
    assert {j["partition"] for j in jobs if j["name"] in moved} == {"cpu"}, jobs
    assert {j["partition"] for j in jobs if j["name"] not in moved} == {"debug"}, jobs
    submitted = sorted(j["name"].removeprefix("smk-") for j in jobs)
    remote = sorted(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("rule "))
    on_login_node = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("localrule ")}
    assert submitted == remote and "train_teacher" in remote
    assert on_login_node <= LOCAL_RULES, on_login_node - LOCAL_RULES  # only CPU-light bookkeeping runs there

    # the same outputs as a local run of the same study (the shared miniature study's: the teacher's longer run
    # and the jobs' partitions change no file name)
    assert set(files_of(workdir / "results" / "embedded")) == miniature_files
    table = json.loads((workdir / "results" / "embedded" / "tiny" / "fkl" / "seed0" / "metrics.json").read_text())
    assert table["num_samples"] == MINIATURE["sample"]["num_samples"]


def test_ctrl_c_cancels_the_submitted_jobs(slurm, presets):
    workdir = miniature(presets, teacher_steps=1_000_000)  # still training whenever the poll below sees it run
    run = slurm_snakemake(workdir, "results/embedded/tiny/teacher/teacher.pt")
    wait_for(lambda: any(j["name"] == "smk-train_teacher" and j["state"] == "RUNNING" for j in our_jobs(workdir))
             or run.poll() is not None, 600, "the teacher's job to run")
    assert run.poll() is None, "snakemake ended before the teacher's job ran:\n" + run.communicate()[0][-3000:]
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole foreground process group
    out, _ = run.communicate(timeout=120)
    assert run.returncode != 0, out[-3000:]
    (job,) = [j for j in our_jobs(workdir) if j["name"] == "smk-train_teacher"]
    # a loaded machine (the CI's two cores busy) has taken over a minute to show the cancellation in sacct
    wait_for(lambda: [j for j in our_jobs(workdir) if j["id"] == job["id"] and j["state"].startswith("CANCELLED")],
             300, f"job {job['id']} to be cancelled; snakemake printed:\n{out[-3000:]}")
    assert "cancelled 1 submitit job" in out, out[-3000:]


# Each run of a shard logs the array task it runs as (Snakemake hands the executor a rule's jobs in an order of its
# own, so task 1 need not be shard 1). Shard 1's first run lasts until the test's signal requeues it: a fixed sleep
# could end before sacct, on a loaded machine, shows it running. Its second run and the other shards finish at once.
ARRAY_WORKFLOW = """
rule all:
    input: expand("out/{i}.txt", i=range(3))

rule shard:
    output: "out/{i}.txt"
    resources: runtime=10
    shell: "echo ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} >> starts_{wildcards.i}.log; "
           "if [ {wildcards.i} = 1 ] && [ $(wc -l < starts_1.log) = 1 ]; then sleep 500; fi; echo done > {output}"
"""


def test_jobs_of_one_rule_go_as_one_array_and_an_element_requeues_alone(slurm, tmp_path):
    """Three ready shards of one rule: one sbatch (tasks A_0..A_2), each task a job of its own to Snakemake; SLURM's
    warning signal to the task running shard 1 requeues that task only, and the workflow completes."""
    (tmp_path / "Snakefile").write_text(ARRAY_WORKFLOW)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(tmp_path / "Snakefile"), "--directory",
                            str(tmp_path), "--executor", "submitit", "--submitit-cluster", "slurm", "--jobs", "3",
                            "--seconds-between-status-checks", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    starts = tmp_path / "starts_1.log"

    def shard_1_running():
        if run.poll() is not None:
            return True
        tasks = starts.read_text().split() if starts.exists() else []
        task = tasks[0] if tasks else None
        return [j for j in our_jobs(tmp_path) if j["id"] == task and j["state"] == "RUNNING"]

    running = wait_for(shard_1_running, 300, "the array task of shard 1 to run")
    assert run.poll() is None, run.communicate()[0][-3000:]
    task = running[0]["id"]
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-5000:]
    jobs = our_jobs(tmp_path)
    assert sorted(j["id"].split("_")[1] for j in jobs) == ["0", "1", "2"], jobs
    assert len({j["id"].split("_")[0] for j in jobs}) == 1, jobs  # one array
    assert {j["state"] for j in jobs} == {"COMPLETED"}, jobs
    runs = [(tmp_path / f"starts_{i}.log").read_text().split() for i in range(3)]
    assert [len(r) for r in runs] == [1, 2, 1] and runs[1] == [task, task], runs  # shard 1 requeued, as its task
    folder = tmp_path / "results" / "logs" / "slurm" / "shard" / "array"
    assert "Requeued job" in "".join(p.read_text() for p in folder.glob(f"{task}_0_log.*"))
