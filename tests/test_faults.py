"""Fault injection: interrupted jobs and runs, shared storage, bad and hostile files.

The miniature study (tests/test_workflow.py, fixture miniature_study) is run once without faults; the tests here
break things around it (kill -9 at random points of each job type, Ctrl-C in a forced rerun, a dry run after an
edit, a second process on one job, a full disk, corrupt and malicious files) and check that nothing is lost,
nothing stale looks complete and no file runs code.
"""
import contextlib
import errno
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import REPO, files_of, job, make_miniature, snakemake
from varkd import io
from varkd.config import ConfigError, GatherSamplesJob, load_yaml, to_yaml
from varkd.study import Study

UMASK = 0o027  # files 0640, folders 0750: what a group-shared results folder gets
TIMING = {"eval_wall_s", "train_wall_s", "provenance"}  # what may differ between two runs of one config


def varkd(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`varkd <args>` in a fresh process, as a rule runs it."""
    return subprocess.run([sys.executable, "-m", "varkd.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **kwargs)


def dry_run(workdir: Path) -> str:
    return snakemake(workdir, "-n", "all").stdout


def varkd_processes(workdir: Path):
    """(pid, command, job config) of each `varkd <command> <job>` process running in `workdir`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        at = next((i for i, a in enumerate(args) if Path(a).name == "varkd" or a == "varkd.cli"), None)
        if at is not None and len(args) > at + 2 and Path(cwd) == workdir:
            yield int(pid), args[at + 1], args[at + 2]


class Killer(threading.Thread):
    """kill -9 of `quota[command]` processes of each command running in `workdir`, each at a random time (0.5 to 4 s)
    after it was first seen; a process that ends first passes its turn to the next one."""

    def __init__(self, workdir: Path, quota: dict[str, int], seed: int):
        super().__init__(daemon=True)
        self.workdir, self.quota, self.rng = workdir, dict(quota), random.Random(seed)
        self.kills: list[tuple[str, str, float]] = []  # command, job config, seconds after it was seen
        self.done = threading.Event()

    def run(self):
        pending: dict[int, tuple[str, str, float, float]] = {}  # pid -> command, config, seen, kill at
        while not self.done.is_set():
            now = time.monotonic()
            for pid, command, config in varkd_processes(self.workdir):
                busy = sum(c == command for c, *_ in pending.values())
                if pid not in pending and self.quota.get(command, 0) > busy:
                    pending[pid] = (command, config, now, now + self.rng.uniform(0.5, 4.0))
            for pid, (command, config, seen, at) in list(pending.items()):
                if now >= at:
                    del pending[pid]
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # it ended first
                        continue
                    self.kills.append((command, config, round(now - seen, 2)))
                    self.quota[command] -= 1
            time.sleep(0.05)


def assert_same_files(files: list[Path], reference: Path, other: Path) -> None:
    """Each file is the same in both results folders: bit for bit, but for wall times in metrics and tables."""
    for f in files:
        a, b = reference / f, other / f
        if f.suffix == ".json":
            first, second = (json.loads(x.read_text()) for x in (a, b))
            assert {k: v for k, v in first.items() if k not in TIMING} == {
                k: v for k, v in second.items() if k not in TIMING}, f
        elif f.suffix == ".csv":
            first, second = pd.read_csv(a), pd.read_csv(b)
            timing = [c for c in first if "wall_s" in c or c == "elapsed_s"]
            pd.testing.assert_frame_equal(first.drop(columns=timing), second.drop(columns=timing), obj=str(f))
        elif f.parent.name != "plots" and f.suffix != ".md" and f.suffix != ".tex":  # figures and tables show times
            assert a.read_bytes() == b.read_bytes(), f


@pytest.mark.slow
def test_jobs_killed_at_random_points_rerun_to_the_same_files(miniature_study, tmp_path):
    """The miniature study's main table again, in another folder and other processes, under a group-sharing umask,
    with kill -9 of a training, a sampling and an evaluation job at random points and reruns until it completes
    (Snakemake deletes a failed job's outputs, a rerun resumes training from its checkpoint): every file is the one
    the uninterrupted run wrote, no leftover of a killed write remains, and every file and folder has the modes the
    umask gives."""
    workdir = tmp_path
    make_miniature(Path(shutil.copytree(REPO / "config", workdir / "config")))
    killer = Killer(workdir, {"train": 1, "sample": 1, "evaluate": 1}, seed=0)
    killer.start()
    outputs = []
    for attempt in range(6):
        result = snakemake(workdir, "results/embedded/tables/main.csv", check=False, umask=UMASK)
        outputs.append(result.stdout + result.stderr)
        if result.returncode == 0:
            break
    killer.done.set()
    assert result.returncode == 0, "\n".join(o[-3000:] for o in outputs)
    print("killed (command, job, seconds after start):", *killer.kills, sep="\n  ")
    assert {command for command, *_ in killer.kills} == {"train", "sample", "evaluate"}
    assert len(outputs) > 1  # the kills failed runs, and the next run finished what they left

    root = workdir / "results" / "embedded"
    files = files_of(root)
    assert set(files) <= set(files_of(miniature_study / "results" / "embedded"))
    assert {f.name for f in files} >= {"tokenizer.pt", "classifier.pt", "teacher.pt", "student.pt", "codes.npy",
                                       "logits_train.npy", "images.npz", "samples.npz", "metrics.json", "main.csv"}
    assert not [f for f in files if ".partial" in f.name or f.name == "checkpoint.pt"]
    assert_same_files(files, miniature_study / "results" / "embedded", root)

    paths = list((workdir / "results").rglob("*"))
    modes = {p.relative_to(workdir).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths}
    assert modes == {p.relative_to(workdir).as_posix(): oct((0o777 if p.is_dir() else 0o666) & ~UMASK) for p in paths}


@pytest.mark.slow
def test_a_gather_killed_at_random_points_reruns_to_the_same_file(tmp_path):
    """kill -9 of `varkd gather-samples` (two shards of 60 MB streamed into samples.npz) at random points, then a
    rerun: the same file as an uninterrupted gather, and no leftover."""
    rng = np.random.default_rng(0)
    shards = []
    for i in range(2):
        shards.append(tmp_path / "samples" / f"shard{i}.npz")
        images = rng.integers(0, 256, (20_000, 32, 32, 3), dtype=np.uint8)
        io.atomic_save_npz(shards[-1], arr_0=images, labels=np.arange(20_000) % 10)
    outputs = {}
    for name in ("clean", "killed"):
        out = tmp_path / name
        config = out / "gather.yaml"
        config.parent.mkdir()
        config.write_text(to_yaml(GatherSamplesJob(shards=[str(s) for s in shards], grid_per_class=2, grid_classes=2,
                                                   out_dir=str(out))))
        if name == "killed":
            for delay in random.Random(0).sample([2.0, 2.5, 3.0, 3.5, 4.0], 2):
                process = subprocess.Popen([sys.executable, "-m", "varkd.cli", "gather-samples", str(config)],
                                           env={**os.environ, "PYTHONPATH": str(REPO)})
                time.sleep(delay)
                process.kill()
                process.wait()
        assert varkd("gather-samples", str(config)).returncode == 0
        outputs[name] = out
        assert not list(out.glob(".*.partial*"))
    for f in ("samples.npz", "grid.png"):
        assert (outputs["clean"] / f).read_bytes() == (outputs["killed"] / f).read_bytes(), f


@pytest.mark.slow
def test_an_interrupted_forced_rerun_is_finished_by_the_next_run(miniature_study):
    """`snakemake all -R <run>/student.pt`, Ctrl-C while it trains: student.pt is gone but the old samples, metrics
    and tables stay; they must not pass for the new model's. The next `snakemake all` retrains and reruns all
    that follows (it said "Nothing to be done")."""
    workdir, run = miniature_study, "results/embedded/tiny/ce/seed0"
    process = snakemake(workdir, "all", "--forcerun", f"{run}/student.pt", background=True)
    deadline = time.monotonic() + 300
    while not (train := [pid for pid, cmd, cfg in varkd_processes(workdir)
                         if cmd == "train" and cfg == f"{run}/config.yaml"]):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.02)
    # Frozen at once, the six-step training cannot finish before the Ctrl-C, however loaded the machine. Ctrl-C: the
    # terminal signals Snakemake and the job (which Snakemake runs in a session of its own); the job gets it when it
    # resumes.
    # The job may end between two of these calls (Snakemake, Ctrl-C'd, ends its jobs): signalling it is then moot.
    with contextlib.suppress(ProcessLookupError):
        os.kill(train[0], signal.SIGSTOP)
    os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(ProcessLookupError):
        os.kill(train[0], signal.SIGINT)
        os.kill(train[0], signal.SIGCONT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0, output[-3000:]
    assert not (workdir / run / "student.pt").exists() and (workdir / run / "metrics.json").exists()
    todo = dry_run(workdir)
    for rule in ("train_student", "sample", "evaluate", "diagnose", "aggregate", "plot"):
        assert f"rule {rule}:" in todo or f"localrule {rule}:" in todo, (rule, todo[-3000:])
    snakemake(workdir, "all")
    assert "Nothing to be done" in dry_run(workdir)


@pytest.mark.slow
def test_a_dry_run_changes_no_file(miniature_study):
    """After a preset edit, `snakemake -n` shows the reruns and leaves every file of the results folder as it was
    (it deleted the edited runs' config.yaml, which then was never written again); with the edit undone, nothing
    is left to do."""
    fkl = miniature_study / "config" / "methods" / "fkl.yaml"
    text = fkl.read_text()

    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (miniature_study / "results").rglob("*")}

    before = snapshot()
    fkl.write_text(text.replace("temperature: 1.0", "temperature: 2.0"))
    try:
        assert "rule train_student:" in dry_run(miniature_study)
        assert snapshot() == before
    finally:
        fkl.write_text(text)
    assert "Nothing to be done" in dry_run(miniature_study)
    assert snapshot() == before


@pytest.mark.slow
def test_a_second_process_on_a_running_job_stops_at_once(codes, tmp_path):
    """Two `varkd train` on one run would both write its checkpoint and interleave train_log.csv: the second stops
    with a message naming the job while the first holds the job's lock."""
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(to_yaml(job(codes, tmp_path / "run", steps=100_000)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "varkd.cli", "train", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (config.parent / "train_log.csv").exists():  # the first process trains: it holds the lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.05)
        second = varkd("train", str(config))
        assert second.returncode == 2
        assert f"another process is running the job {config}" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None  # untouched
    finally:
        first.send_signal(signal.SIGTERM)  # checkpoints and exits
        first.communicate(timeout=120)
    steps = pd.read_csv(config.parent / "train_log.csv")["step"]
    assert steps.is_unique and steps.is_monotonic_increasing


# --- full disk, killed writes, corrupt and hostile files -----------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_is_named(codes, tmp_path):
    """A write that fails for want of room names the file and the OS error, through torch's C++ writer too (it
    said `enforce fail at inline_container.cc`), in one line, and leaves nothing behind."""
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text(to_yaml(job(codes, tmp_path / "run", steps=8)))

    def limit_file_size():  # the kernel refuses writes past 20 kB (EFBIG), as a full disk refuses any (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = varkd("train", str(config), preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("varkd train: error: [Errno 27] File too large: could not write ") and "checkpoint.pt" \
        in error, result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "run").glob(".*.partial*"))

    # ENOSPC as torch reports it: a RuntimeError whose context is the OS error
    def full_disk(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match=r"No space left on device: could not write .*student\.pt") as err:
            io.atomic_torch_save(tmp_path / "student.pt", {})
    assert err.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob(".student.pt.partial*")) and not (tmp_path / "student.pt").exists()


@pytest.mark.slow
def test_a_killed_writes_leftover_is_removed_when_its_job_starts(codes, tmp_path):
    """A write killed by kill -9 leaves its hidden temporary file (hundreds of MB for a checkpoint); it has a fixed
    name per file, and the next run of the job removes it first thing (here the job then fails on a missing
    input, after the removal)."""
    out = tmp_path / "run"
    out.mkdir()
    config = out / "config.yaml"
    config.write_text(to_yaml(job(codes, out, init=str(tmp_path / "missing.pt"))))
    leftover = io.partial_path(out / "student.pt")
    leftover.write_bytes(b"\0" * 1_000_000)
    result = varkd("train", str(config))
    assert result.returncode == 2 and "missing.pt does not exist" in result.stderr, result.stderr
    assert not leftover.exists()


def test_every_reader_names_a_corrupt_file(tmp_path):
    arrays = tmp_path / "samples.npz"
    np.savez(arrays, arr_0=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
    arrays.write_bytes(arrays.read_bytes()[:300])  # truncated: zipfile's BadZipFile
    with pytest.raises(ValueError, match=r"samples .*samples\.npz is corrupt or unreadable \(BadZipFile"):
        io.load_npz(arrays, ["arr_0"], "samples")
    (tmp_path / "metrics.json").write_text('{"fid": 1.0,')
    with pytest.raises(ValueError, match=r"metrics file .*metrics\.json is corrupt"):
        io.load_json(tmp_path / "metrics.json", "metrics file")
    (tmp_path / "codes.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"codes .*codes\.npy is corrupt"):
        io.load_npy(tmp_path / "codes.npy", "codes", mmap_mode="r")
    with pytest.raises(FileNotFoundError, match=r"log .*nothing\.csv does not exist"):
        io.read_csv(tmp_path / "nothing.csv", "log")


@pytest.mark.slow
def test_aggregate_refuses_a_run_without_its_identity(tmp_path):
    """A metrics.json whose method is null was silently dropped from the table (exit 0)."""
    for name, method in (("a", "ce"), ("b", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"backbone": "tiny", "method": method, "seed": 0,
                                                                  "fid": 1.0}))
    result = varkd("aggregate", str(tmp_path / "a" / "metrics.json"), str(tmp_path / "b" / "metrics.json"),
                   "--out-dir", str(tmp_path / "tables"))
    assert result.returncode == 2
    assert f"metrics file {tmp_path / 'b' / 'metrics.json'} has no ['method']" in result.stderr
    assert not (tmp_path / "tables").exists()


MALICIOUS = b"cos\nsystem\n(S'touch {marker}'\ntR."  # a pickle that runs a shell command when loaded


def test_no_weights_file_runs_code(tmp_path):
    """torch-fidelity loads the Inception weights without weights-only: importing varkd makes every
    torch.load weights-only, and varkd reads the file itself first, naming it."""
    import torch_fidelity

    import varkd.metrics as vm

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(MALICIOUS.replace(b"{marker}", str(marker).encode()))
    images = np.zeros((8, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048), arr_0=images)
    reference = vm.read_reference_batch(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match=rf"{weights.name} is corrupt or unreadable \(UnpicklingError"):
        vm.reference_batch_metrics(images, reference, weights_path=weights)
    with pytest.raises(Exception, match="Weights only load failed"):  # torch-fidelity's own load, called directly
        torch_fidelity.utils.create_feature_extractor("inception-v3-compat", ["2048"],
                                                      feature_extractor_weights_path=str(weights), cuda=False)
    assert not marker.exists()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirement = next(d for d in dependencies if d.startswith("torch>"))
    assert requirement == "torch>=2.6"  # weights_only before 2.6 can be bypassed (CVE-2025-32434)
    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)


# --- study files ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_templates_are_refused(tmp_path, presets):
    """`__use_yte__: true` makes a study file a YTE template, code Snakemake runs when it reads it: `varkd
    check-config` refuses it without running it, the workflow stops before any job."""
    marker = tmp_path / "pwned"
    study = tmp_path / "evil.yaml"
    study.write_text(f"__use_yte__: true\nstudy: ?__import__('os').system('touch {marker}') or 'x'\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: __use_yte__ makes it a YTE template"):
        load_yaml(study)
    result = varkd("check-config", str(presets / "config.yaml"), str(study), cwd=presets.parent)
    assert result.returncode == 2 and "__use_yte__" in result.stderr and not marker.exists()
    out = snakemake(presets.parent, "-n", "all", "--configfile", str(study), check=False)
    assert out.returncode != 0 and "evil.yaml: __use_yte__ makes it a YTE template" in out.stdout + out.stderr
    assert "Job stats" not in out.stdout + out.stderr


@pytest.mark.slow
def test_study_file_mistakes_are_one_message(tmp_path, presets, monkeypatch):
    """A misspelt top-level key printed ~200 lines of JSON schema; a YAML syntax error gave no line; `study: ..`
    wrote job configs outside results/; check-config run elsewhere said `available: []`."""
    (tmp_path / "typo.yaml").write_text("studdy: mine\n")
    out = snakemake(presets.parent, "-n", "all", "--configfile", str(tmp_path / "typo.yaml"), check=False)
    out = out.stdout + out.stderr
    assert "Key 'studdy' not in 'StudyConfig'. Did you mean: 'study'?" in out and len(out.splitlines()) < 12, out

    fkl = presets / "methods" / "fkl.yaml"
    fkl.write_text("terms: [{divergence: fkl}\n")
    out = snakemake(presets.parent, "-n", "all", check=False)
    out = out.stdout + out.stderr
    assert "config/methods/fkl.yaml, line 2, column 1: not valid YAML: while parsing a flow sequence" in out, out
    (tmp_path / "broken.yaml").write_text("seeds: [0, 1\nstudy: x\n")
    result = varkd("check-config", str(tmp_path / "broken.yaml"))
    assert result.returncode == 2 and "broken.yaml, line 2, column 6: not valid YAML" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    data = load_yaml(REPO / "config" / "config.yaml")
    data.study = ".."
    with pytest.raises(ConfigError, match=r"study: '\.\.'"):
        Study.load(data)
    data.study = "embedded"
    data.presets = "config"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=rf"no folder {tmp_path}/elsewhere/config .*run from the repository root"):
        Study.load(data)


@pytest.mark.parametrize("option", ["--nproc", "--threads"])
def test_negative_process_and_thread_counts_are_refused(option, tmp_path):
    result = varkd("train", str(tmp_path / "x.yaml"), option, "-1")
    assert result.returncode == 2 and f"argument {option}: -1 is less than" in result.stderr


def test_a_file_system_without_locks_runs_jobs_unguarded(tmp_path, monkeypatch, capsys):
    """Lustre mounted without flock refuses locks: jobs still run, with a warning, instead of all failing."""
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io.fcntl, "flock", refuse)
    with io.job_lock(tmp_path / "config.yaml"):
        pass
    assert "the file system refuses locks (No locks available)" in capsys.readouterr().err
