"""Runs that survive kills and bad input, as a user runs them: subprocesses of `python -m bqat.train`."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

import bqat.models  # noqa: F401  (registers resnet32)
from conftest import ROOT, run_cli
from test_resume import Payload

# Three short epochs on 16x16 digits: long enough to be killed between checkpoints.
FAST = ["trainer.epochs=3", "partner.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.progress=false", "data.batch_size=16", "data.image_size=16"]
TIMES = {"wall_seconds", "train_seconds"}


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMES | {"resumed_from_epoch"}}


def same_twin(run_a, run_b) -> bool:
    """The final twins (weights, step sizes, BN statistics) are bit-identical."""
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["twin"] for r in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def command(run_dir, partners):
    return [*FAST, f"hydra.run.dir={run_dir}", f"partner.cache_dir={partners}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run; it trains the partner into a fresh cache."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_cli(command(tmp / "run", tmp / "partners"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert metrics["epoch"] == 3 and metrics["resumed_from_epoch"] is None
    return {"metrics": metrics, "partners": tmp / "partners", "run": tmp / "run"}


def start_until_first_checkpoint(args, run_dir, tmp):
    """Start a run in the background and return it as soon as its first last.pt exists."""
    out, err = open(tmp / "stdout.txt", "w"), open(tmp / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bqat.train", *args], cwd=ROOT, stdout=out, stderr=err,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    last = run_dir / "checkpoints" / "last.pt"
    while not last.exists():
        assert proc.poll() is None, (tmp / "stderr.txt").read_text()[-3000:]
        time.sleep(0.01)
    return proc


def test_identical_seeded_runs_give_identical_metrics_whether_the_partner_is_trained_or_cached(reference, tmp_path):
    proc = run_cli(command(tmp_path / "run", reference["partners"]), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "partner: reusing" in (tmp_path / "run" / "train.log").read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert numbers(metrics) == numbers(reference["metrics"])
    assert same_twin(tmp_path / "run", reference["run"])


def test_run_killed_after_its_first_checkpoint_resumes_to_the_configured_epoch(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = command(run_dir, reference["partners"])
    proc = start_until_first_checkpoint(args, run_dir, tmp_path)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    killed_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 3

    again = run_cli(args, cwd=ROOT)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"took over {run_dir / 'run.lock'}: its holder, PID {proc.pid} on host" in (run_dir / "train.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 3 and metrics["resumed_from_epoch"] == killed_at
    assert numbers(metrics) == numbers(reference["metrics"])  # exact resume: as if never killed
    assert same_twin(run_dir, reference["run"])
    assert not (run_dir / "run.lock").exists()  # released at the end


def test_sigterm_finishes_the_step_saves_and_exits_with_one_line(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_until_first_checkpoint(command(run_dir, reference["partners"]), run_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    (line,) = [ln for ln in stderr.splitlines() if "stopped by SIGTERM" in ln]
    assert line.startswith("bqat-train: twin stopped by SIGTERM after step") and "re-run the same command to resume" in line
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert f"after step {saved['step']} " in line and saved["epoch"] < 3
    assert not (run_dir / "metrics.json").exists()


def test_ctrl_c_finishes_the_step_saves_exits_130_and_the_rerun_resumes_exactly(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = command(run_dir, reference["partners"])
    proc = start_until_first_checkpoint(args, run_dir, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = [ln for ln in stderr.splitlines() if "stopped by SIGINT" in ln]
    assert line.startswith("bqat-train: twin stopped by SIGINT after step") and "re-run the same command to resume" in line
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert f"after step {saved['step']} " in line and f"saved {run_dir / 'checkpoints' / 'last.pt'}" in line

    again = run_cli(args, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == saved["epoch"]
    assert numbers(metrics) == numbers(reference["metrics"])
    assert same_twin(run_dir, reference["run"])


def test_a_second_process_on_a_live_run_folder_stops_at_once_and_the_first_is_undisturbed(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = command(run_dir, reference["partners"])
    first = start_until_first_checkpoint(args, run_dir, tmp_path)
    first.send_signal(signal.SIGSTOP)  # alive and holding the folder, whatever the machine's speed
    try:
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        second = run_cli([*args, "resume=false"], cwd=ROOT)  # would set the live run's files aside
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        first.send_signal(signal.SIGCONT)
    # CPU seconds, not wall: on a loaded machine the imports alone may take longer than 10 s.
    assert (cpu.ru_utime + cpu.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime) < 10
    assert second.returncode == 2 and "Traceback" not in second.stderr
    (line,) = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"bqat-train: error: run folder {run_dir} is in use by another run: PID {first.pid} on this host")
    assert not (run_dir / "previous").exists()

    assert first.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert numbers(metrics) == numbers(reference["metrics"])  # as if never disturbed
    assert same_twin(run_dir, reference["run"])


# --- bad input: one line, non-zero exit, no traceback -------------------------------------

# Each case runs in its own process, forked from one that imported bqat once (cheap):
# the child runs main() as the console script would and reports like the interpreter.
DRIVER = r"""
import json, os, sys, traceback
from bqat.train import main
cases, out_dir = json.loads(sys.argv[1]), sys.argv[2]
codes = {}
for name, args in cases.items():
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.path.join(out_dir, name + ".err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["bqat-train", *args]
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""

BAD_INPUT = {
    "bits_out_of_range": (["bits=9"], "bits must be an integer from 2 to 8, got '9'"),
    "bits_not_an_integer": (["bits=2.5"], "bits must be an integer from 2 to 8, got '2.5'"),
    "bits_w_not_an_integer": (["bits.w=2.5"], "bits.w must be an integer from 2 to 8, got 2.5"),
    "unknown_model": (["model=resnt20"], "unknown model 'resnt20' (did you mean resnet20"),
    "unknown_timm_model": (["model=timm", "model.name=resnet2"], "unknown model 'resnet2'; did you mean"),
    "unknown_quantizer": (["quant=lsqq"], "unknown quantizer 'lsqq' (did you mean lsq?); choose one of: dorefa, ewgs, lsq, lsqplus, none, pact"),
    "unknown_schedule": (["schedule=prefx"], "unknown schedule 'prefx' (did you mean prefix?); choose one of: none, prefix"),
    "unknown_dataset": (["data=cifar"], "unknown dataset 'cifar' (did you mean cifar10 or cifar100?); choose one of: cifar10, cifar100, digits, imagefolder, imagenet"),
    "unknown_key": (["trainer.epoch=3"], "Could not override 'trainer.epoch'"),
    "negative_epochs": (["trainer.epochs=-1"], "trainer.epochs must be an integer >= 0, got -1"),
    "batch_size_zero": (["data.batch_size=0"], "data.batch_size must be an integer of at least 1, got 0"),
    "resume_not_a_choice": (["resume=last"], "resume must be true, false or best, got 'last'"),
    "missing_checkpoint": (["partner.checkpoint={tmp}/nowhere.pt"], "checkpoint not found: {tmp}/nowhere.pt"),
    "other_architecture": (["partner.checkpoint={tmp}/resnet32.pt"], "does not fit model CifarResNet (unexpected: layer1.3."),
    "pickle_payload": (["partner.checkpoint={tmp}/evil.pt"], "not a plain weights file"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    torch.save(timm.create_model("resnet32", num_classes=10).state_dict(), tmp / "resnet32.pt")
    torch.save({"state_dict": Payload(tmp / "pwned")}, tmp / "evil.pt")
    cases = {name: [*FAST, f"hydra.run.dir={tmp}/{name}", f"partner.cache_dir={tmp}/partners"] + [a.format(tmp=tmp) for a in args]
             for name, (args, _) in BAD_INPUT.items()}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), str(tmp)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (codes[name], (tmp / f"{name}.err").read_text()) for name in BAD_INPUT}, tmp


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_ends_in_one_line_without_traceback(bad_input_runs, case):
    runs, tmp = bad_input_runs
    code, stderr = runs[case]
    expected = BAD_INPUT[case][1].format(tmp=tmp)
    assert code == 2, stderr
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bqat-train: error: "), stderr
    assert expected in lines[0]
    if case == "pickle_payload":
        assert not (tmp / "pwned").exists()  # refused without running its code
