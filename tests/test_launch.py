"""The launchers without a cluster: local runs (threads, exit codes, signals) and SLURM option handling."""
from __future__ import annotations

import json
import os
import pickle
import platform
import signal
import subprocess
import sys
import time

import pytest

from d2v2.config import ConfigError, validate
from d2v2.launch import main
from d2v2.launch.local import ALLOCATOR_ENV, job_env
from d2v2.launch.slurm import CheckpointableCommand, Command, SlurmOptions

LAUNCH = [sys.executable, "-m", "d2v2", "launch"]


def _run_without_allocator_env(command: list[str]) -> str:
    """stdout of ``command`` run from this environment minus the launcher's allocator variables."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def test_local_fixes_thread_count():
    out = subprocess.run(LAUNCH + ["--backend", "local", "--threads", "1", "--", sys.executable, "-c",
                                   "import os, torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]


def test_local_returns_the_command_exit_code():
    assert main(["--backend", "local", "--", sys.executable, "-c", "raise SystemExit(7)"]) == 7
    assert main(["--backend", "local", "--", sys.executable, "-c", "pass"]) == 0


def test_local_forwards_sigterm_so_the_command_can_checkpoint(tmp_path):
    marker = tmp_path / "stopped"
    program = (f"import signal, sys, time, pathlib\n"
               f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('ok'), sys.exit(0)))\n"
               f"print('ready', flush=True)\n"
               f"time.sleep(60)\n")
    proc = subprocess.Popen(LAUNCH + ["--backend", "local", "--", sys.executable, "-c", program],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert marker.read_text() == "ok" and time.monotonic() - t0 < 20


def test_job_env_rejects_zero_threads():
    with pytest.raises(ValueError, match="threads"):
        job_env(0)


def test_a_launched_run_records_its_allocator_settings():
    code = "import json; from d2v2.engine.provenance import provenance; print(json.dumps(provenance()['allocator']))"

    def recorded(launch: list[str]) -> dict:
        return json.loads(_run_without_allocator_env(launch + [sys.executable, "-c", code]))

    assert recorded(LAUNCH + ["--backend", "local", "--threads", "1", "--"]) == ALLOCATOR_ENV
    assert recorded([]) == dict.fromkeys(ALLOCATOR_ENV)


def test_job_env_sets_the_allocator_unless_set():
    env = job_env(2, base={"MALLOC_TRIM_THRESHOLD_": "0"})
    assert env["MALLOC_MMAP_THRESHOLD_"] == ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == "0" and env["OMP_NUM_THREADS"] == "2"


# 20 steps of a tiny-width MLP block forward and backward: megabyte temporaries, allocated and freed each step
_STEPS = """
import resource, torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Linear(48, 192), torch.nn.GELU(), torch.nn.Linear(192, 48))
x = torch.randn(4736, 48)
for step in range(23):
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the settings are glibc malloc's")
def test_launched_steps_reuse_freed_memory():
    """Under the launcher the steps run on memory already mapped; with glibc's defaults their temporaries
    are mapped afresh and the kernel zero-fills every page on first touch (a page fault each)."""
    def page_faults(launch: list[str]) -> int:
        return int(_run_without_allocator_env(launch + [sys.executable, "-c", _STEPS]))

    default = page_faults([])
    launched = page_faults(LAUNCH + ["--backend", "local", "--threads", "1", "--"])
    assert default > 5000 and launched < default / 4, (default, launched)


def test_missing_command_is_an_error(capsys):
    assert main(["--backend", "local"]) == 2
    assert "no command" in capsys.readouterr().err


def test_slurm_backend_without_partition_names_the_key(capsys):
    assert main(["--backend", "slurm", "--", "true"]) == 2
    assert "slurm.partition" in capsys.readouterr().err


def test_slurm_options_validate_and_name_the_key():
    with pytest.raises(ConfigError, match="slurm.mem_gb"):
        validate(SlurmOptions, {"partition": "p", "mem_gb": -1}, where="slurm")
    with pytest.raises(ConfigError, match="slurm.gpus: unknown key"):
        validate(SlurmOptions, {"partition": "p", "gpus": 8}, where="slurm")


def test_slurm_options_map_to_submitit_parameters():
    opts = SlurmOptions(partition="gpu", account="acc", qos="high", constraint="volta32gb", nodes=2,
                        gpus_per_node=8, cpus_per_task=10, mem_gb=400, time_min=4320, signal_delay_s=120,
                        setup=["module load cuda"], sbatch={"exclusive": True})
    p = opts.executor_parameters()
    assert p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8 and p["nodes"] == 2   # one task per GPU
    assert (p["slurm_partition"], p["slurm_account"], p["slurm_qos"], p["slurm_constraint"]) == \
        ("gpu", "acc", "high", "volta32gb")
    assert p["timeout_min"] == 4320 and p["slurm_signal_delay_s"] == 120 and p["mem_gb"] == 400
    assert p["slurm_setup"] == ["module load cuda"] and p["slurm_additional_parameters"] == {"exclusive": True}
    cpu = SlurmOptions(partition="cpu").executor_parameters()
    assert cpu["tasks_per_node"] == 1 and "gpus_per_node" not in cpu and "slurm_account" not in cpu


def test_sbatch_flag_needs_key_value(capsys):
    assert main(["--backend", "slurm", "--partition", "p", "--sbatch", "novalue", "--", "true"]) == 2
    assert "--sbatch 'novalue'" in capsys.readouterr().err


def test_checkpoint_resubmits_the_same_immutable_command():
    job = CheckpointableCommand(argv=("python", "-m", "d2v2", "pretrain"), cwd="/x", threads=2)
    delayed = job.checkpoint()     # no running child in this process: nothing to stop
    assert delayed.function == job and delayed.args == () and delayed.kwargs == {}
    assert pickle.loads(pickle.dumps(delayed.function)) == job
    with pytest.raises(AttributeError):   # frozen: a requeue can never carry changed state
        job.argv = ("other",)
    assert not hasattr(Command(argv=("true",), cwd="/"), "checkpoint")


def test_options_json_is_read_and_flags_override_it():
    from d2v2.launch import _slurm_options, build_parser

    args = build_parser().parse_args(["--backend", "slurm", "--threads", "2", "--options-json",
                                      '{"partition": "p", "mem_gb": 8, "setup": ["a"], "sbatch": {"x": 1}}',
                                      "--mem-gb", "16", "--setup", "b", "--sbatch", "y=2", "--", "true"])
    options = _slurm_options(args)
    assert (options.partition, options.mem_gb, options.cpus_per_task) == ("p", 16, 2)
    assert options.setup == ["a", "b"] and options.sbatch == {"x": 1, "y": 2}
    assert main(["--backend", "slurm", "--options-json", "[1]", "--", "true"]) == 2


def test_workflow_job_options_lay_the_kind_over_the_shared_settings():
    slurm = {"partition": "gpu", "account": None, "setup": ["module load x"], "sbatch": {"exclusive": True},
             "pretrain": {"gpus_per_node": 8, "setup": ["echo pre"], "sbatch": {"reservation": "r"}, "qos": None},
             "finetune": {"mem_gb": 16}}
    pre = SlurmOptions.for_job(slurm, "pretrain", threads=4)
    assert (pre.gpus_per_node, pre.cpus_per_task, pre.mem_gb, pre.account) == (8, 4, 4.0, None)
    assert pre.setup == ["module load x", "echo pre"] and pre.sbatch == {"exclusive": True, "reservation": "r"}
    fine = SlurmOptions.for_job(slurm, "finetune", threads=1)
    assert (fine.gpus_per_node, fine.mem_gb, fine.setup) == (0, 16, ["module load x"])
    with pytest.raises(ConfigError, match="slurm.finetune.mem_gb"):
        SlurmOptions.for_job({**slurm, "finetune": {"mem_gb": -1}}, "finetune", threads=1)
    with pytest.raises(ConfigError, match="slurm.partition: required"):
        SlurmOptions.for_job({"partition": None}, "pretrain", threads=1)
