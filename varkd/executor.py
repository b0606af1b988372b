"""A Snakemake executor that submits each job through submitit: to SLURM on a cluster, to subprocesses elsewhere.

Snakemake keeps the scheduling, the status polling and the cancellation; submitit writes the sbatch script (a job
array for jobs of one rule handed over together), reads job states with sacct and requeues a job that gets SLURM's
warning signal (time limit or preemption).
The plugin module `snakemake_executor_plugin_submitit` (workflow/executor/) re-exports this module, so that
`--executor submitit` finds it. Profile keys and flags are `submitit-<setting>` / `--submitit-<setting>`;
partition, account, QOS and GPU type also come from `SNAKEMAKE_SUBMITIT_<SETTING>` environment variables.
(No `from __future__ import annotations` here: Snakemake uses the settings' field types as argparse types.)
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncGenerator, Optional

import submitit
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings, ExecutorSettingsBase


def _setting(help: str, env: bool = False, **kw) -> dict:
    return {"metadata": {"help": help, "env_var": env, "required": False}, **kw}


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    cluster: str = field(default="auto", **_setting("slurm, local (subprocesses on this machine) or auto: slurm "
                                                    "when sbatch is on PATH"))
    partition: Optional[str] = field(default=None, **_setting("SLURM partition", env=True))
    account: Optional[str] = field(default=None, **_setting("SLURM account", env=True))
    qos: Optional[str] = field(default=None, **_setting("SLURM QOS", env=True))
    gpu_type: Optional[str] = field(default=None, **_setting("GPU type for --gres=gpu:<type>:<n> (a rule's "
                                                             "gpu_model resource wins)", env=True))
    additional_parameters: Optional[str] = field(default=None, **_setting(
        "other sbatch options for every job, as key=value[,key=value] (e.g. constraint=a100,exclusive=true)",
        env=True))
    max_requeues: int = field(default=3, **_setting("requeues a job may use (time limits and preemptions) before "
                                                    "it fails"))
    signal_delay_s: int = field(default=120, **_setting("seconds before the time limit at which SLURM warns the "
                                                        "job (USR2), so that it checkpoints and requeues"))
    stop_grace_s: int = field(default=60, **_setting("seconds the job's command gets to checkpoint after SIGTERM"))
    log_dir: str = field(default="results/logs/slurm", **_setting("submitit folders: <log_dir>/<rule>/<run>/"))


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,  # submitit's pickles and logs need a shared file system anyway
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=False,  # sbatch exports the submitting environment (PATH to varkd included)
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=1,
)


class RequeueLimitError(RuntimeError):
    """A job that would need more requeues than max_requeues allows."""


class JobCommand(submitit.helpers.Checkpointable):
    """The Snakemake job's command line, run in the SLURM job (or local subprocess).

    On SLURM's USR2 submitit calls `checkpoint`: the command gets SIGTERM (training writes a checkpoint and
    exits), then this object is requeued with the count raised; a rerun resumes from the checkpoint.
    """

    def __init__(self, command: str, max_requeues: int, stop_grace_s: float, requeues: int = 0):
        self.command, self.max_requeues, self.stop_grace_s, self.requeues = command, max_requeues, stop_grace_s, requeues
        self._process: Optional[subprocess.Popen] = None

    def __call__(self) -> None:
        # Its own process group, so that a stop reaches every process; USR2 ignored, since scancel --signal and
        # SLURM's warning signal reach the whole job step and would kill the command before it checkpoints.
        self._process = subprocess.Popen(["/bin/bash", "-c", self.command], start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        try:
            code = self._process.wait()
        except BaseException:  # a local job's cancel is SIGINT to this process: stop the command with it
            self._stop()
            raise
        if code != 0:
            raise RuntimeError(f"the job's command exited with status {code} (after {self.requeues} requeues); "
                               "see the rule's log file")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # srun forwards the signal too, so a second USR2 follows the first: one stop is enough, and a nested one
        # would wait on the process that the interrupted frame is waiting on.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        self._stop()
        if self.requeues >= self.max_requeues:
            raise RequeueLimitError(f"the job was stopped again after {self.requeues} requeues, its limit; raise "
                                    "submitit-max-requeues in the profile or the rule's runtime in the study's "
                                    "resources")
        return submitit.helpers.DelayedSubmission(
            JobCommand(self.command, self.max_requeues, self.stop_grace_s, self.requeues + 1))

    def _stop(self) -> None:
        """SIGTERM to the command's process group, SIGKILL after the grace period.

        Runs inside a signal handler that interrupted `Popen.wait`, which holds the Popen's lock: so it watches
        the group and reaps the child with os calls, never through the Popen.
        """
        if self._process is None:
            return
        group = self._process.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            return
        for sig, wait_s in ((signal.SIGKILL, self.stop_grace_s), (None, 10.0)):
            deadline = time.monotonic() + wait_s
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.1)
            if sig is None or not _group_alive(group):
                return
            os.killpg(group, sig)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}  # a running process does not travel in the requeue pickle


def _group_alive(group: int) -> bool:
    """Whether any process of the group lives; reaps the leader (our child) once it has exited."""
    try:
        os.waitpid(group, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def check_accounting() -> None:
    """submitit learns that a job died without a result only through sacct: without it, Snakemake would hang."""
    if shutil.which("sacct") is None:
        raise WorkflowError("submitit executor: `sacct` is not on PATH. SLURM job accounting is required: without "
                            "it a cancelled or killed job is never seen to end. Use --submitit-cluster local to run "
                            "without SLURM.")
    probe = subprocess.run(["sacct", "--noheader", "--allocations", "--format=JobID", "--starttime=now"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise WorkflowError(f"submitit executor: `sacct` fails ({probe.stderr.strip() or probe.returncode}). SLURM "
                            "job accounting (slurmdbd) is required: without it a cancelled or killed job is never "
                            "seen to end. Ask the cluster's admins, or use --submitit-cluster local.")


def parse_key_values(text: Optional[str]) -> dict:
    """'constraint=a100,exclusive=true' -> {'constraint': 'a100', 'exclusive': True}."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise WorkflowError(f"submitit-additional-parameters: expected key=value, got {item!r}")
        out[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return out


# The resources a rule may ask SLURM for (the study's `resources.<rule>`, or `--set-resources rule:name=value`),
# named as snakemake-executor-plugin-slurm names them, and Snakemake's own. Any other name is an error: a
# misspelt `slurm_partiton` would otherwise send the job to the default partition without a word.
SLURM_RESOURCES = {"slurm_partition", "slurm_account", "slurm_extra", "qos", "constraint", "runtime", "mem_mb",
                   "cpus_per_task", "gpu", "gpu_model"}
SNAKEMAKE_RESOURCES = {"_cores", "_nodes", "_job_count", "threads", "tmpdir", "mem", "mem_mib", "disk", "disk_mb",
                       "disk_mib"}


def parse_sbatch_options(text: str) -> dict:
    """slurm_extra '--exclusive --mail-type=END' -> {'exclusive': True, 'mail_type': 'END'} (submitit's form)."""
    out = {}
    for option in shlex.split(text):
        key, sep, value = option.partition("=")
        if not key.startswith("--") or len(key) < 3:
            raise WorkflowError(f"slurm_extra: expected sbatch options --name[=value], got {option!r}")
        out[key[2:].replace("-", "_")] = value if sep else True
    return out


def job_parameters(job: JobExecutorInterface, settings: ExecutorSettings) -> dict:
    """A job's Snakemake resources as submitit parameters (generic ones, then slurm_* ones); a rule's resource wins
    over the profile's setting of the same option."""
    res = job.resources
    unknown = sorted(set(res.keys()) - SLURM_RESOURCES - SNAKEMAKE_RESOURCES)
    if unknown:
        raise WorkflowError(f"rule {job.name}: unknown resource(s) {unknown}; the submitit executor takes "
                            f"{sorted(SLURM_RESOURCES)} (as snakemake-executor-plugin-slurm)")
    gpus = int(res.get("gpu", 0) or 0)
    params = {"timeout_min": int(res.get("runtime", 60)), "cpus_per_task": int(res.get("cpus_per_task", job.threads)),
              "mem_gb": int(res.get("mem_mb", 4000)) / 1024, "tasks_per_node": 1, "nodes": 1,
              "name": f"smk-{job.name}"}
    gpu_type = res.get("gpu_model") or settings.gpu_type
    if gpus and gpu_type:
        params["slurm_gres"] = f"gpu:{gpu_type}:{gpus}"
    elif gpus:
        params["gpus_per_node"] = gpus
    for key, resource in (("partition", "slurm_partition"), ("account", "slurm_account"), ("qos", "qos")):
        value = res.get(resource) or getattr(settings, key)
        if value:
            params[f"slurm_{key}"] = value
    if res.get("constraint"):
        params["slurm_constraint"] = res["constraint"]
    params["slurm_signal_delay_s"] = settings.signal_delay_s
    extra = {**parse_key_values(settings.additional_parameters), **parse_sbatch_options(res.get("slurm_extra", ""))}
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def run_folder(job: JobExecutorInterface, root: str) -> Path:
    """<root>/<rule>/<wildcard values>: one folder per rule and run, e.g. train_student/embedded/tiny/fkl/0."""
    if job.is_group():
        return Path(root).absolute() / "group" / str(job.groupid) / str(job.jobid)
    wildcards = json.loads(job.properties()).get("wildcards", {})  # the job's properties, as a JSON string
    values = [re.sub(r"[^A-Za-z0-9_.=-]+", "/", str(v)) for v in wildcards.values()] or ["run"]
    return Path(root, job.name, *values).absolute()


class Executor(RemoteExecutor):
    def __post_init__(self):
        self.settings: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        cluster = self.settings.cluster
        if cluster == "auto":
            cluster = "slurm" if shutil.which("sbatch") else "local"
        if cluster not in ("slurm", "local"):
            raise WorkflowError(f"submitit-cluster={self.settings.cluster!r} is not one of auto, slurm, local")
        if cluster == "slurm":
            if shutil.which("sbatch") is None:
                raise WorkflowError("submitit-cluster=slurm but sbatch is not on PATH")
            check_accounting()
        self.cluster = cluster
        # Every submitted job not yet seen to end. Snakemake's own list is empty while a status check runs (it takes
        # the jobs out, checks them, puts the running ones back): a Ctrl-C then cancelled nothing and the jobs ran on.
        self.unfinished: dict[str, submitit.Job] = {}
        self.logger.info(f"submitit executor: {cluster} jobs, logs under {self.settings.log_dir}/")

    @property
    def cores(self):
        return "all"  # a job's own threads, not the submitting host's --cores, bound it on its node

    def run_jobs(self, jobs: list[JobExecutorInterface]):
        """Jobs of one rule with the same sbatch options that Snakemake hands over together go to SLURM as one job
        array (submitit's batch): one sbatch call and one queue entry for, say, 300 extraction shards. Each task
        stays one job to Snakemake, requeued and cancelled on its own."""
        batches: dict[tuple, tuple[dict, list]] = {}
        for job in jobs:
            self.run_job_pre(job)
            params = job_parameters(job, self.settings)
            same = self.cluster == "slurm" and not job.is_group()
            key = (job.name, json.dumps(params, sort_keys=True)) if same else (id(job),)
            batches.setdefault(key, (params, []))[1].append(job)
        for params, batch in batches.values():
            self.submit(batch, params)

    def run_job(self, job: JobExecutorInterface):
        self.submit([job], job_parameters(job, self.settings))

    def submit(self, jobs: list[JobExecutorInterface], params: dict) -> None:
        """One job, its logs in its run's folder, or an array of jobs of one rule with the same submitit `params`,
        their logs in <rule>/array/."""
        folder = run_folder(jobs[0], self.settings.log_dir) if len(jobs) == 1 else \
            Path(self.settings.log_dir).absolute() / jobs[0].name / "array"
        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster,
                                         slurm_max_num_timeout=self.settings.max_requeues + 1)
        executor.update_parameters(**params)
        commands = [JobCommand(self.format_job_exec(job), self.settings.max_requeues, self.settings.stop_grace_s)
                    for job in jobs]
        try:
            if len(jobs) == 1:
                submitted = [executor.submit(commands[0])]
            else:
                with executor.batch():
                    submitted = [executor.submit(command) for command in commands]
        except Exception as err:
            raise WorkflowError(f"submitit could not submit {len(jobs)} {jobs[0].name} job(s) (folder {folder}): "
                                f"{err}") from err
        for job, one in zip(jobs, submitted):
            self.unfinished[str(one.job_id)] = one
            self.logger.info(f"{job.name}: submitted as {self.cluster} job {one.job_id}, logs in {folder}/")
            self.report_job_submission(SubmittedJobInfo(job, external_jobid=str(one.job_id), aux={"submitit": one}))

    async def check_active_jobs(self, active_jobs: list[SubmittedJobInfo]) -> AsyncGenerator[SubmittedJobInfo, None]:
        if active_jobs and self.cluster == "slurm":
            async with self.status_rate_limiter:
                active_jobs[0].aux["submitit"].watcher.update()  # one sacct call for every job
        for info in active_jobs:
            submitted = info.aux["submitit"]
            if not submitted.done():
                yield info
                continue
            self.unfinished.pop(str(submitted.job_id), None)
            try:
                submitted.result()
            except Exception as err:
                logs = [str(submitted.paths.stdout), str(submitted.paths.stderr)]
                self.report_job_error(info, msg=f"submitit {self.cluster} job {submitted.job_id} failed "
                                                f"(state {submitted.state}): {str(err).strip()[-2000:]}\n"
                                                f"SLURM logs: {' '.join(logs)}\n",
                                      aux_logs=logs)
            else:
                self.report_job_success(info)

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]):
        jobs = {**self.unfinished, **{info.external_jobid: info.aux["submitit"] for info in active_jobs}}
        for job in jobs.values():
            job.cancel(check=False)
        if jobs:
            self.logger.info(f"cancelled {len(jobs)} submitit job(s)")
