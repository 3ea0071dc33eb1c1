"""firmad used as a careless and a hostile user would: interruptions, one writer per run folder,
durable files and user mistakes. Every test here failed, or could not have passed, before the
behaviour it checks was made right.

Cases of the reliability issue -> the tests that cover them:

 1. SIGINT / SIGTERM (real signals to a `python -m firmad.cli train` subprocess), then --resume:
    the weights and the AUROC of an uninterrupted run -> test_signal_then_resume_is_exact
 2. SIGINT, SIGTERM and SIGKILL at seeded random moments, resumed each time, ending with the
    same tensors -> test_random_interruptions_end_with_the_same_run
 3. metrics.jsonl after resumes: epochs 1..N once, the uninterrupted run's losses, strict JSON
    -> `_assert_same_log` in the two tests above and in the full-disk test
 4. --resume with the run's own options is accepted -> test_signal_then_resume_is_exact;
    changed options refused before any work, naming the keys
    -> test_resume_refuses_changed_options;
    config.yaml edited (tau, fewer / more epochs, width) refused at resume and at evaluate
    -> test_edited_config_yaml_is_refused,
       test_edited_config_yaml_without_stored_config_is_a_short_error
 5. `firmad demo` twice; an interrupted demo resumes -> test_demo_twice_and_after_an_interrupt
 6. a second writer on the same --out: exit 2 naming the holder, the first run intact
    -> test_signal_then_resume_is_exact
 7. --out over the user's own files (their config.yaml, notes, metrics.jsonl, report, a file):
    refused; nothing created, overwritten or appended
    -> test_user_folder_is_never_written_into, test_a_file_as_out_is_refused
 8. --set name=../../x without --out stays under runs/ -> test_run_name_cannot_leave_runs
 9. fsync and checksums on the checkpoint path -> test_checkpoints_are_synced_and_checksummed;
    a flipped byte fails --resume and evaluate, naming the file -> test_flipped_byte_in_weights;
    a damaged checkpoint.json is named, with no advice to delete anything
    -> test_damaged_checkpoint_json;
    a save cut between its two renames (SIGKILL) is completed; Ctrl-C never cuts one
    -> test_checkpoint_cut_between_renames_is_completed,
       test_ctrl_c_between_renames_waits_for_the_pair
10. clear errors, exit 2, nothing lost:
    malformed --set YAML, threads=-1, size=100000, --device tpu
    -> test_bad_options_fail_before_any_work;
    --scorers "knn_cos:k=[1" on evaluate -> test_evaluate_refuses_bad_scorers;
    a read-only --out (subprocess without CAP_DAC_OVERRIDE)
    -> test_read_only_out_is_a_storage_error;
    a full disk -> test_full_disk_during_checkpoint_keeps_the_last_one,
       test_full_disk_during_plots;
    checkpoint.json [1, 2] / {"finished": true} / without optimizer
    -> test_damaged_checkpoint_json, test_checkpoint_json_without_optimizer;
    a broken or empty config.yaml in a run -> test_broken_run_config_yaml;
    evaluate of a folder that holds no run -> test_evaluate_of_no_run_creates_nothing;
    Ctrl-C: exit 130 and what was kept -> test_ctrl_c_says_what_was_kept
11. scorer parameters and eval.batch_size=0 checked before the first step
    -> test_bad_options_fail_before_any_work;
    evaluate may change a finished run's eval settings -> test_evaluate_may_change_eval_settings
12. 1e-3 in --set of a real run -> test_run_name_cannot_leave_runs; 1.0e9 in --set and
    `lr: 1e-4` in a recipe -> tests/test_config.py::test_scientific_notation_is_a_number_everywhere
13. data.channels=1 on an RGB source is converted -> test_grayscale_model_of_rgb_data;
    a run that failed before its first checkpoint does not block the same command
    -> test_failed_start_does_not_block_a_retry
14. a diverging run stops at the first non-finite loss, exit 2, strict JSON log, the last good
    checkpoint untouched, also with a GPU's sparser finiteness checks
    -> test_divergence_keeps_the_last_good_checkpoint,
       test_failed_start_does_not_block_a_retry (train.lr=1e9, twice)
15. readers -> tests/test_data.py: test_idx_labels_out_of_range,
    test_npz_float_labels_are_refused, test_folder_unreadable_subfolder_is_not_skipped,
    test_idx_permission_denied_is_not_called_corrupt
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import firmad
from firmad.cli import main
from firmad.errors import CheckpointError
from firmad.io import load_checkpoint, save_checkpoint
from firmad.run import RunDir
from firmad.training import Trainer
from tests.conftest import TINY, run_in_read_only_folder, sigint_at_call

SRC = Path(firmad.__file__).resolve().parents[1]  # the firmad these tests imported
# One recipe for every run here: 6 epochs of 4 steps, a checkpoint every epoch, one thread
# (the same arithmetic in this process and in subprocesses).
REF = [*TINY, "train.epochs=6", "train.checkpoint_every=1", "train.threads=1"]
LINUX = sys.platform == "linux"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Runs here set one thread (train.threads=1); other tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train_args(out: Path, extra=(), resume: bool = False, evaluate: bool = True) -> list[str]:
    args = ["-q", "train", "--config", "fmnist-cpu", "--out", str(out)]
    for item in [*REF, *extra]:
        args += ["--set", item]
    return args + (["--resume"] if resume else []) + ([] if evaluate else ["--no-eval"])


def _run_main(args: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _strict_json(line: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


def _log(run: Path) -> list[tuple]:
    """(epoch, step, loss, lr) of each epoch line; every line must be strict JSON."""
    entries = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["epoch"], e["step"], e["loss"], e["lr"]) for e in entries if "curve" not in e]


def _assert_same_log(run: Path, reference: Path) -> None:
    log = _log(run)
    assert [e[0] for e in log] == list(range(1, 7))  # each epoch once, in order
    assert log == _log(reference)  # and the same losses: one run, as if never interrupted


def _assert_same_tensors(run: Path, reference: Path) -> None:
    a = load_file(str(run / "checkpoint.safetensors"))
    b = load_file(str(reference / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _results(run: Path) -> list[dict]:
    return json.loads((run / "results.json").read_text())["results"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted, evaluated run of REF."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _run_main(_train_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> Path:
    """REF stopped by SIGINT during step 6 (epoch 2, two steps in)."""
    out = tmp_path_factory.mktemp("partial") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", sigint_at_call(Trainer.train_step, 6))
        assert _run_main(_train_args(out, evaluate=False)) == 130
    meta = json.loads((out / "checkpoint.json").read_text())
    assert (meta["global_step"], meta["reason"]) == (6, "interrupted")
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    return dest


# --- subprocesses -------------------------------------------------------------------------------


def _spawn(args: list[str], log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "firmad.cli", *args],
        env=env,
        stdout=open(log_dir / "stdout", "w"),  # noqa: SIM115 - closed with the process
        stderr=open(log_dir / "stderr", "w"),  # noqa: SIM115
    )


def _wait_until(condition, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """True once `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return condition()
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the training subprocess made no progress")
        time.sleep(0.01)
    return True


def _epochs_logged(run: Path) -> int:
    """Complete epoch lines in metrics.jsonl (a line being written is not counted)."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.split("\n")[:-1] if line.startswith('{"epoch"'))


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


# --- 1, 3, 4, 6: a real signal, a second writer, then --resume ----------------------------------


@pytest.mark.numeric
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_then_resume_is_exact(tmp_path, reference, capsys, sig):
    out = tmp_path / "run"
    proc = _spawn(_train_args(out), tmp_path / "proc")
    try:
        assert _wait_until(lambda: _epochs_logged(out) >= 1, proc), "finished before the signal"
        proc.send_signal(signal.SIGSTOP)  # held inside epoch 2, however fast this machine is
        try:
            # 6: a second writer is refused, naming the first, and changes nothing.
            assert _run_main(_train_args(out)) == 2
            err = capsys.readouterr().err
            assert f"in use by pid {proc.pid}" in err and "Traceback" not in err
        finally:
            proc.send_signal(sig)  # delivered when it continues
            proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=180) == 130
    finally:
        proc.kill()
    stderr = (tmp_path / "proc" / "stderr").read_text()
    assert "a checkpoint was saved after step" in stderr
    assert f"continue with `firmad train --resume --out {out}`" in stderr
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["reason"] == "interrupted" and not meta["finished"]

    # 4: the run's own command with --resume is accepted; it ends where an uninterrupted run ends.
    assert _run_main(_train_args(out, resume=True)) == 0
    _assert_same_tensors(out, reference)
    _assert_same_log(out, reference)
    assert _results(out) == _results(reference)  # the same AUROC, AUPR, FPR95


# --- 2, 3: random SIGINT / SIGTERM / SIGKILL ---------------------------------------------------


@pytest.mark.numeric
def test_random_interruptions_end_with_the_same_run(tmp_path, reference):
    rng = random.Random(20251)
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    times = [e["time_s"] for e in map(json.loads, lines) if "time_s" in e]
    epoch_s = min(b - a for a, b in zip(times, times[1:], strict=False))  # on this machine
    plan = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    rng.shuffle(plan)
    out, stopped = tmp_path / "run", []
    for i, sig in enumerate(plan):
        log, before = out / "metrics.jsonl", _inode(out / "metrics.jsonl")
        resume = (out / "config.yaml").exists()
        proc = _spawn(_train_args(out, resume=resume, evaluate=False), tmp_path / f"p{i}")
        try:
            # The loop has started once the log was (re)written; then maybe one more epoch.
            going = _wait_until(lambda: _inode(log) not in (None, before), proc)  # noqa: B023
            if going and rng.random() < 0.5:
                seen = _epochs_logged(out)
                going = _wait_until(lambda: _epochs_logged(out) > seen, proc)  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.5) * epoch_s)
            proc.send_signal(sig)
            rc = proc.wait(timeout=180)
        finally:
            proc.kill()
        allowed = {-signal.SIGKILL} if sig == signal.SIGKILL else {130, -sig}
        assert rc in allowed | {0}, (sig.name, rc, (tmp_path / f"p{i}" / "stderr").read_text())
        if rc == 0:
            break  # it finished first
        stopped.append(sig.name)
    assert sorted(stopped) == sorted(s.name for s in plan)  # each one cut the run
    resume = (out / "config.yaml").exists()
    assert _run_main(_train_args(out, resume=resume, evaluate=False)) == 0
    _assert_same_tensors(out, reference)
    _assert_same_log(out, reference)
    assert not list(out.glob(".*.tmp"))  # what killed writers left was cleaned up


# --- 4: changed options, edited config.yaml -------------------------------------------------------


def test_resume_refuses_changed_options(tmp_path, partial, capsys, monkeypatch):
    run = _copy(partial, tmp_path)
    before = _files(run)

    def no_work(cfg):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr("firmad.pipeline.build_split", no_work)
    changed = ["method.tau=0.5", "model.width=0.5"]
    args = _train_args(run, changed, resume=True) + ["--epochs", "9"]
    assert _run_main(args) == 2
    err = capsys.readouterr().err
    for key in ("method.tau: 0.2 -> 0.5", "model.width: 0.25 -> 0.5", "train.epochs: 6 -> 9"):
        assert key in err
    assert _files(run) == before


EDITS = {
    "tau": ("method", "tau", 0.5, "method.tau"),
    "fewer-epochs": ("train", "epochs", 3, "train.epochs"),
    "more-epochs": ("train", "epochs", 12, "train.epochs"),
    "width": ("model", "width", 0.5, "model.width"),
}


def _edit_config(run: Path, section: str, key: str, value) -> None:
    data = yaml.safe_load((run / "config.yaml").read_text())
    data[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_edited_config_yaml_is_refused(tmp_path, partial, reference, capsys, edit, command):
    section, key, value, dotted = EDITS[edit]
    run = _copy(partial if command == "resume" else reference, tmp_path)
    _edit_config(run, section, key, value)
    before = _files(run)
    args = ["-q", "train", "--out", str(run), "--resume"] if command == "resume" else None
    assert _run_main(args or ["-q", "evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint in {run}" in err and dotted in err
    for crash in ("tried to step", "size mismatch", "Traceback"):
        assert crash not in err
    assert _files(run) == before


def test_edited_config_yaml_without_stored_config_is_a_short_error(tmp_path, partial, capsys):
    """A checkpoint.json without its copy of the config (hand-edited or older): a wider model
    than the weights is a one-line error, not PyTorch's list of every tensor."""
    run = _copy(partial, tmp_path)
    meta = json.loads((run / "checkpoint.json").read_text())
    del meta["config"]
    (run / "checkpoint.json").write_text(json.dumps(meta))
    _edit_config(run, "model", "width", 0.5)
    assert _run_main(["-q", "train", "--out", str(run), "--resume", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "run's own config.yaml" in err
    assert err.count("size mismatch") == 1 and "more" in err and "Traceback" not in err


# --- 5: demo ------------------------------------------------------------------------------------


def test_demo_twice_and_after_an_interrupt(tmp_path, monkeypatch, capsys):
    import firmad.config

    real = firmad.config.load_config
    monkeypatch.setattr(firmad.config, "load_config", lambda r, o: real(r, [*o, *TINY]))
    out = tmp_path / "demo"
    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_step", sigint_at_call(Trainer.train_step, 3))
        assert _run_main(["-q", "demo", "--out", str(out)]) == 130
    assert f"continue with `firmad demo --out {out}`" in capsys.readouterr().err
    assert json.loads((out / "checkpoint.json").read_text())["reason"] == "interrupted"

    assert _run_main(["-q", "demo", "--out", str(out)]) == 0  # resumes, finishes, evaluates
    first = capsys.readouterr().out
    assert "knn_cos" in first and "AUROC" in first
    assert [e[0] for e in _log(out)] == [1, 2]
    before = _files(out)
    assert _run_main(["-q", "demo", "--out", str(out)]) == 0  # shows the finished result
    assert capsys.readouterr().out == first
    assert _files(out) == before


# --- 7, 8: whose folder ---------------------------------------------------------------------------

USER_FOLDERS = {
    "recipe": {"config.yaml": "train:\n  epochs: 3\n"},
    "recipe+notes": {"config.yaml": "train:\n  epochs: 3\n", "notes.txt": "mine"},
    "metrics": {"metrics.jsonl": "my own numbers\n"},
    "report": {"report.md": "# my report\n", "plots/fig.png": "png"},
}


@pytest.mark.parametrize("files", USER_FOLDERS.values(), ids=list(USER_FOLDERS))
def test_user_folder_is_never_written_into(tmp_path, capsys, files):
    out = tmp_path / "mine"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _files(out)
    commands = [_train_args(out), ["-q", "demo", "--out", str(out)]]
    if "config.yaml" in files:  # their recipe is a valid config: --resume must not take it
        commands.append(["-q", "train", "--out", str(out), "--resume"])
    for args in commands:
        assert _run_main(args) == 2, args
        err = capsys.readouterr().err
        assert "no firmad run wrote" in err and "Traceback" not in err
        assert _files(out) == before  # not even a lock file


def test_a_file_as_out_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("mine")
    for args in (_train_args(out), ["-q", "evaluate", str(out)]):
        assert _run_main(args) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "Traceback" not in err
    assert out.read_text() == "mine"


def test_run_name_cannot_leave_runs(tmp_path, monkeypatch):
    from firmad.config import load_config
    from firmad.pipeline import default_run_dir

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    args = ["-q", "train", "--config", "fmnist-cpu", "--no-eval"]
    for item in [*TINY, "train.epochs=1", "name=../../x", "train.lr=1e-3"]:  # 12: 1e-3
        args += ["--set", item]
    assert _run_main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    (run,) = [p.parent for p in work.rglob("config.yaml")]
    assert run.relative_to(work).parts[0] == "runs" and len(run.relative_to(work).parts) == 3
    assert RunDir(run).read_config().train.lr == 1e-3
    for name in ("..", "../..", "/etc/x", "a/../../b", ".hidden", "~", ""):
        path = default_run_dir(load_config("fmnist-cpu", [f"name={name!r}"]))
        assert path.parts[0] == "runs" and len(path.parts) == 3, path
        assert not any(part in ("", ".", "..") or part.startswith(".") for part in path.parts)


# --- 9: checksums, fsync, renames ---------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="names file descriptors through /proc")
def test_checkpoints_are_synced_and_checksummed(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    assert _run_main(_train_args(out, ["train.epochs=1"], evaluate=False)) == 0
    for name in ("checkpoint.safetensors", "checkpoint.json", "config.yaml"):
        assert any(s.startswith(f".{name}.") for s in synced), (name, synced)  # the data
    assert "run" in synced  # and the folder holding the renamed names
    meta = json.loads((out / "checkpoint.json").read_text())
    digest = hashlib.sha256((out / "checkpoint.safetensors").read_bytes()).hexdigest()
    assert meta["weights_sha256"] == digest


def _flip_a_weight_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + (len(raw) - header) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_flipped_byte_in_weights(tmp_path, partial, reference, capsys, command):
    run = _copy(partial if command == "resume" else reference, tmp_path)
    _flip_a_weight_byte(run / "checkpoint.safetensors")
    before = _files(run)
    args = ["-q", "train", "--out", str(run), "--resume"]
    assert _run_main(args if command == "resume" else ["-q", "evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint.safetensors'} is damaged" in err and "SHA-256" in err
    assert _files(run) == before


DAMAGED_JSON = {
    "list": ("[1, 2]", "got list"),
    "finished-only": ('{"finished": true}', "lacks the entries"),
    "not-json": ("{not json", "is damaged"),
    "empty": ("", "is damaged"),
}


@pytest.mark.parametrize("damage", DAMAGED_JSON, ids=list(DAMAGED_JSON))
def test_damaged_checkpoint_json(tmp_path, partial, capsys, damage):
    content, fragment = DAMAGED_JSON[damage]
    run = _copy(partial, tmp_path)
    (run / "checkpoint.json").write_text(content)
    before = _files(run)
    with pytest.raises(CheckpointError, match=fragment):
        RunDir(run).state  # noqa: B018 - the state is read through the same check
    for args in (
        ["-q", "train", "--out", str(run), "--resume"],
        ["-q", "evaluate", str(run)],
        ["-q", "demo", "--out", str(run)],
    ):
        assert _run_main(args) == 2
        err = capsys.readouterr().err
        assert f"{run / 'checkpoint.json'}" in err and fragment in err, err
        assert "delete" not in err.lower() and "Traceback" not in err
    assert _files(run) == before


def test_checkpoint_json_without_optimizer(tmp_path, partial, reference, capsys):
    for source in (partial, reference):
        run = _copy(source, tmp_path / source.parent.name)
        meta = json.loads((run / "checkpoint.json").read_text())
        del meta["optimizer"]
        (run / "checkpoint.json").write_text(json.dumps(meta))
        if source is partial:  # continuing needs the optimizer's state
            assert _run_main(["-q", "train", "--out", str(run), "--resume"]) == 2
            err = capsys.readouterr().err
            assert f"{run / 'checkpoint.json'}" in err and "['optimizer']" in err
        else:  # scoring a finished run does not
            assert _run_main(["-q", "evaluate", str(run)]) == 0


def test_checkpoint_cut_between_renames_is_completed(tmp_path):
    """SIGKILL (or a power cut) between the renames of the weights and of the JSON: both were
    written and synced first, so the lock holder finishes the save."""
    old, new = tmp_path / "run", tmp_path / "next"
    tensors = {"model.w": torch.arange(6.0)}
    meta = {"format": "firmad-checkpoint-1", "epoch": 1, "global_step": 4, "finished": False}
    save_checkpoint(old, "checkpoint", tensors, meta)
    save_checkpoint(new, "checkpoint", {"model.w": tensors["model.w"] + 1}, {**meta, "epoch": 2})
    shutil.copy(new / "checkpoint.safetensors", old / "checkpoint.safetensors")  # renamed
    shutil.copy(new / "checkpoint.json", old / ".checkpoint.json.k1ll3d.tmp")  # not yet
    (old / ".checkpoint.safetensors.0ther.tmp").write_bytes(b"half a file")  # an older kill
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(old, "checkpoint")
    with RunDir(old):
        loaded, got = load_checkpoint(old, "checkpoint")
    assert got["epoch"] == 2 and torch.equal(loaded["model.w"], tensors["model.w"] + 1)
    assert sorted(p.name for p in old.iterdir()) == [
        ".lock",
        "checkpoint.json",
        "checkpoint.safetensors",
    ]


def test_ctrl_c_between_renames_waits_for_the_pair(tmp_path, monkeypatch):
    meta = {"format": "firmad-checkpoint-1", "epoch": 1, "global_step": 4, "finished": False}
    save_checkpoint(tmp_path, "ck", {"w": torch.zeros(3)}, meta)
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".safetensors"):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the weights' rename

    monkeypatch.setattr(os, "replace", replace)
    # Python's own Ctrl-C handler, also where the suite was started with SIGINT ignored (a
    # background job of a non-interactive shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, "ck", {"w": torch.ones(3)}, {**meta, "epoch": 2})
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    tensors, got = load_checkpoint(tmp_path, "ck")  # a matching pair: the new one
    assert got["epoch"] == 2 and torch.equal(tensors["w"], torch.ones(3))


# --- 10, 11: user mistakes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (["--set", "train.lr=[1,2"], "train.lr=[1,2"),
        (["--set", "train.threads=-1"], "train.threads"),
        (["--set", "data.size=100000"], "data.size"),
        (["--device", "tpu"], "train.device"),
        (["--set", "eval.scorers=[knn_cos:k=0]"], "knn_cos:k=0"),
        (["--set", "eval.scorers=[knn_cos:q=1]"], "unknown parameter 'q'"),
        (["--set", "eval.batch_size=0"], "eval.batch_size"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, capsys, monkeypatch, option, fragment):
    def no_work(cfg):
        raise AssertionError("data loaded with invalid options")

    monkeypatch.setattr("firmad.pipeline.build_split", no_work)
    out = tmp_path / "run"
    assert _run_main(_train_args(out) + option) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_refuses_bad_scorers(tmp_path, reference, capsys):
    run = _copy(reference, tmp_path)
    before = _files(run)
    for spec, fragment in (("knn_cos:k=[1", "not valid YAML"), ("knn_cos:k=0", "k must be")):
        assert _run_main(["-q", "evaluate", str(run), "--scorers", spec]) == 2
        err = capsys.readouterr().err
        assert spec in err and fragment in err and "Traceback" not in err
    assert _files(run) == before


def test_evaluate_may_change_eval_settings(tmp_path, reference, capsys):
    run = _copy(reference, tmp_path)
    _edit_config(run, "eval", "batch_size", 64)  # the eval section may be edited
    args = ["-q", "evaluate", str(run), "--scorers", "knn_cos:k=3", "--variants", "angled"]
    assert _run_main(args) == 0
    got = {(r["scorer"], r["k"], r["variant"]) for r in _results(run)}
    assert ("knn_cos", 3, "angled") in got and ("knn_cos", 5, "plain") in got  # others kept


def test_evaluate_of_no_run_creates_nothing(tmp_path, capsys):
    assert _run_main(["-q", "evaluate", str(tmp_path / "typo")]) == 2
    assert "not a firmad run directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["", "train: [1", "- a list\n"], ids=["empty", "bad", "list"])
def test_broken_run_config_yaml(tmp_path, partial, capsys, content):
    run = _copy(partial, tmp_path)
    (run / "config.yaml").write_text(content)
    before = _files(run)
    for args in (["-q", "train", "--out", str(run), "--resume"], ["-q", "evaluate", str(run)]):
        assert _run_main(args) == 2
        err = capsys.readouterr().err
        assert f"{run / 'config.yaml'}" in err and "Restore it" in err and "Traceback" not in err
    assert _files(run) == before


_TRAIN_INTO_FOLDER = """
from firmad.cli import main
tiny = [a for item in json.loads(sys.argv[2]) for a in ("--set", item)]
codes = [main(["-q", "train", "--config", "fmnist-cpu", "--out", str(out), *tiny])
         for out in (folder, folder / "sub")]
print(json.dumps({"codes": codes}))
"""


@pytest.mark.skipif(not LINUX, reason="uses Linux capabilities and file modes")
def test_read_only_out_is_a_storage_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    proc, result = run_in_read_only_folder(
        folder, _TRAIN_INTO_FOLDER, json.dumps(TINY), timeout=300
    )
    assert result["codes"] == [2, 2], proc.stderr
    assert proc.stderr.count("read-only") == 2 and "Traceback" not in proc.stderr
    assert list(folder.iterdir()) == []


def _disk_full_when(monkeypatch, full) -> None:
    """os.write fails with ENOSPC for files whose name `full(name)` accepts."""
    real_write = os.write

    def write(fd, data):
        if full(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not LINUX, reason="names file descriptors through /proc")
def test_full_disk_during_checkpoint_keeps_the_last_one(tmp_path, reference, capsys, monkeypatch):
    out = tmp_path / "run"
    # The first checkpoint is written; the disk is full when the second one is.
    _disk_full_when(
        monkeypatch,
        lambda name: name.startswith(".checkpoint.") and (out / "checkpoint.json").exists(),
    )
    assert _run_main(_train_args(out, evaluate=False)) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors: the disk is full" in err and "Traceback" not in err
    monkeypatch.undo()
    _, meta = load_checkpoint(out, "checkpoint")  # intact, checksum and all
    assert meta["global_step"] == 4 and meta["reason"] == "periodic"
    assert not list(out.glob(".*.tmp"))
    # Nothing lost: once there is space, the run continues to the same end.
    assert _run_main(_train_args(out, resume=True, evaluate=False)) == 0
    _assert_same_tensors(out, reference)
    _assert_same_log(out, reference)


@pytest.mark.skipif(not LINUX, reason="names file descriptors through /proc")
def test_full_disk_during_plots(tmp_path, reference, capsys, monkeypatch):
    run = _copy(reference, tmp_path)
    plots = _files(run / "plots")
    _disk_full_when(monkeypatch, lambda name: name.endswith(".tmp") and ".png." in name)
    assert _run_main(["-q", "evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert ".png: the disk is full" in err and "Traceback" not in err
    monkeypatch.undo()
    assert _files(run / "plots") == plots  # the previous plots, whole
    assert _results(run) == _results(reference)
    assert not list((run / "plots").glob(".*")) and not list(run.glob(".*.tmp"))


def test_ctrl_c_says_what_was_kept(tmp_path, monkeypatch, capsys):
    from firmad.training import TrainingInterrupted

    out = tmp_path / "run"

    def stopped(*args, **kwargs):
        raise TrainingInterrupted("SIGTERM", 7)

    def early(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("firmad.pipeline.train_run", stopped)
    assert _run_main(_train_args(out)) == 130
    err = capsys.readouterr().err
    assert f"saved after step 7; continue with `firmad train --resume --out {out}`" in err
    monkeypatch.setattr("firmad.pipeline.train_run", early)  # e.g. while the data loads
    assert _run_main(_train_args(out)) == 130
    err = capsys.readouterr().err
    assert "run the command again" in err and "checkpoint was saved" not in err


# --- 13, 14 ---------------------------------------------------------------------------------------


def test_grayscale_model_of_rgb_data(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8)
    images[40:, :, :, 0] //= 4  # class 1: less red
    np.savez(tmp_path / "rgb.npz", images=images, labels=np.repeat([0, 1], 40))
    out = tmp_path / "run"
    extra = [
        f"data.dataset=npz:{tmp_path / 'rgb.npz'}",
        "data.root=null",
        "data.channels=1",
        "train.epochs=1",
    ]
    assert _run_main(_train_args(out, extra)) == 0
    stem = load_file(str(out / "checkpoint.safetensors"))["model.encoder.net.stem.0.weight"]
    assert stem.shape[1] == 1  # a one-channel model, fed converted images
    assert all(0 <= r["auroc"] <= 1 for r in _results(out))


def test_failed_start_does_not_block_a_retry(tmp_path, capsys, monkeypatch):
    from firmad.errors import DataError

    out = tmp_path / "run"

    def broken(self):
        raise DataError("the first step failed")

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_step", broken)
        assert _run_main(_train_args(out, evaluate=False)) == 2
    assert RunDir(out).state == "started"
    capsys.readouterr()
    assert _run_main(_train_args(out, ["train.epochs=1"], evaluate=False)) == 0

    # A diverging start (lr=1e9) fails the same way each time: never "already holds a run".
    out = tmp_path / "diverging"
    for _ in range(2):
        assert _run_main(_train_args(out, ["train.lr=1e9"], evaluate=False)) == 2
        err = capsys.readouterr().err
        assert "the loss became" in err and "lower train.lr" in err and "already" not in err


@pytest.mark.parametrize("check_every", [1, 10], ids=["cpu-checks", "gpu-checks"])
def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, check_every):
    """NaN from step 6 on (epoch 2): a checkpoint after epoch 1 exists. With a GPU's check every
    10 steps the NaN is still caught before the save at the end of epoch 2."""
    compute_loss, fit = Trainer.compute_loss, Trainer.fit

    def poisoned(self, *args):
        loss = compute_loss(self, *args)
        return loss * float("nan") if self.global_step == 5 else loss

    def fit_with_checks(self):
        self.finite_check_every = check_every
        return fit(self)

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    monkeypatch.setattr(Trainer, "fit", fit_with_checks)
    out = tmp_path / "run"
    assert _run_main(_train_args(out)) == 2
    err = capsys.readouterr().err
    step = 6 if check_every == 1 else 8
    assert f"the loss became nan at step {step}" in err and "Traceback" not in err
    tensors, meta = load_checkpoint(out, "checkpoint")
    assert meta["global_step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values())
    assert [e[0] for e in _log(out)] == [1]  # strict JSON, the good epoch only
