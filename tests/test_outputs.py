"""Outputs: only regular files, only where named, never inside an input, never into a folder of
the user's images; export's pair written together. The helper, then every command that writes."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from firmad import outputs
from firmad.cli import main
from firmad.errors import FirmadError, InputError, StorageError
from firmad.io import atomic_write_text
from tests.conftest import FIXTURE_FMNIST
from tests.test_detector import TRAIN


def special(tmp: Path, kind: str) -> Path:
    """A FIFO, a socket, a character device (like /dev/null) or a folder at tmp/KIND."""
    path = tmp / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "device":
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    else:
        path.mkdir()
    return path


KINDS = ["fifo", "socket", "device", "folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_but_a_regular_file_is_replaced(tmp_path, kind):
    path = special(tmp_path, kind)
    mode = os.stat(path).st_mode
    with pytest.raises(InputError, match="is a|is an"):
        outputs.check_file(path, "--out", example="scores.csv")
    with pytest.raises(StorageError, match="never replaces"):
        atomic_write_text(path, "x")  # the last guard of every atomic write
    assert os.stat(path).st_mode == mode  # still what it was
    assert [p.name for p in tmp_path.iterdir()] == [kind]  # no temporary file left


def test_output_files_and_folders_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="it is a file, not a folder"):
        outputs.check_file(tmp_path / "afile" / "sub.csv", "--out")
    with pytest.raises(InputError, match="not a folder"):
        outputs.check_folder(tmp_path / "afile", "--out")
    with pytest.raises(StorageError, match="cannot write in /proc"):
        outputs.check_folder(Path("/proc/firmad-x"), "--out")
    images = tmp_path / "images"
    (images / "deep").mkdir(parents=True)
    (images / "deep" / "a.png").write_bytes(b"png")
    with pytest.raises(InputError, match=r"holds images of yours \(e.g. deep/a.png\)"):
        outputs.check_folder(images, "--out")
    with pytest.raises(InputError, match="inside the input"):
        outputs.check_folder(images / "det", "--out", inputs=[images])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x")
    (tmp_path / "run" / "roc.png").write_bytes(b"png")
    assert outputs.check_folder(tmp_path / "run", "--out") == tmp_path / "run"  # firmad's own
    assert outputs.check_file(tmp_path / "new" / "s.csv") == tmp_path / "new" / "s.csv"
    assert not list(tmp_path.rglob(".firmad-write-test-*"))


def test_the_image_names_are_those_firmad_reads():
    from firmad.inputs import IMAGE_SUFFIXES

    assert set(IMAGE_SUFFIXES) <= outputs.IMAGE_SUFFIXES


def test_a_pair_is_written_together_or_not_at_all(tmp_path, monkeypatch):
    a, b = tmp_path / "m.onnx", tmp_path / "m.onnx.json"
    a.write_text("old model")
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        outputs.write_together([(a, b"new model"), (b, b"{}")])
    monkeypatch.setattr(os, "replace", real)
    assert a.read_text() == "old model" and not b.exists()  # the first rename was undone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    special(tmp_path, "folder").rename(b)
    with pytest.raises(StorageError):
        outputs.write_together([(a, b"new model"), (b, b"{}")])
    assert a.read_text() == "old model"


# --- per command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder of fixture PNGs and a detector fitted on it by `firmad fit`."""
    from PIL import Image

    from firmad.data import one_vs_rest

    root = tmp_path_factory.mktemp("outputs")
    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=10)
    (root / "images").mkdir()
    for i, img in enumerate(split.train_images[:64]):
        Image.fromarray(img[0].numpy()).save(root / "images" / f"{i}.png")
    args = ["-q", "fit", str(root / "images"), "--out", str(root / "det")]
    assert main(args + [a for item in TRAIN for a in ("--set", item)]) == 0
    return root


def run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["-q", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_score_never_replaces_a_special_file(work, tmp_path, capsys, kind):
    out = special(tmp_path, kind)
    code, err = run(capsys, "score", str(work / "det"), str(work / "images" / "0.png"),
                    "--out", str(out))  # fmt: skip
    assert code == 2 and f"--out {out} is a" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]  # no -report folder beside it


def test_score_checks_its_outputs_before_scoring(work, tmp_path, capsys):
    code, err = run(capsys, "score", str(work / "det"), str(work / "images"),
                    "--out", "/proc/firmad-s.csv")  # fmt: skip
    assert code == 2 and "cannot write in /proc" in err and "scored" not in err
    # the report beside the CSV would sit inside the scored folder: its PNGs would be scored
    code, err = run(capsys, "score", str(work / "det"), str(work / "images"),
                    "--out", str(work / "images" / "s.csv"))  # fmt: skip
    assert code == 2 and "inside the input" in err and not (work / "images" / "s.csv").exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_export_never_replaces_a_special_file(work, tmp_path, capsys, kind):
    out = special(tmp_path, kind)
    code, err = run(capsys, "export", str(work / "det"), "--out", str(out))
    assert code == 2 and f"--out {out} is a" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


def test_export_keeps_the_users_sidecar_and_writes_both_or_neither(work, tmp_path, capsys):
    (tmp_path / "a.onnx.json").write_text("mine")
    code, err = run(capsys, "export", str(work / "det"), "--out", str(tmp_path / "a.onnx"))
    assert code == 2 and "not a firmad export's contract" in err
    assert (tmp_path / "a.onnx.json").read_text() == "mine"
    (tmp_path / "b.onnx.json").mkdir()  # a folder where the contract goes: nothing written
    code, err = run(capsys, "export", str(work / "det"), "--out", str(tmp_path / "b.onnx"))
    assert code == 2 and "is a folder" in err and not (tmp_path / "b.onnx").exists()
    code, err = run(capsys, "export", str(work / "det"), "--out", "/proc/firmad-x.onnx")
    assert code == 2 and "cannot write in /proc" in err


def test_export_replaces_its_own_earlier_pair(work, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    out = tmp_path / "c.onnx"
    for _ in range(2):
        code, err = run(capsys, "export", str(work / "det"), "--out", str(out))
        assert code == 0, err
    assert json.loads((tmp_path / "c.onnx.json").read_text())["format"].startswith("firmad")


def test_fit_writes_outside_its_images_only(work, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out, message in [
        (work / "images" / "det", "inside the input"),  # its plots would be training images
        (Path("/proc/firmad-x"), "cannot write in /proc"),
        (tmp_path / "afile" / "sub", "it is a file, not a folder"),
        (special(tmp_path, "fifo"), "is a named pipe"),
    ]:
        code, err = run(capsys, "fit", str(work / "images"), "--out", str(out))
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (work / "images" / "det").exists()


def test_attack_never_writes_into_a_folder_of_images(work, capsys):
    before = sorted(p.name for p in (work / "images").iterdir())
    code, err = run(capsys, "attack", str(work / "det"), "--out", str(work / "images"),
                    "--data", "fashion-mnist", "--normal-class", "0")  # fmt: skip
    assert code == 2 and "holds images of yours" in err
    assert sorted(p.name for p in (work / "images").iterdir()) == before


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--config", "fmnist-cpu"],
        ["bench", "--config", str(BENCHMARKS / "fmnist-cpu-grid.yaml")],
        ["features", "--config", str(BENCHMARKS / "features-fmnist-cpu.yaml")],
    ],
)
@pytest.mark.parametrize("kind", ["afile", "fifo"])
def test_run_folders_are_folders(tmp_path, capsys, command, kind):
    if kind == "afile":
        out = tmp_path / "afile"
        out.write_text("mine")
    else:
        out = special(tmp_path, kind)
    code, err = run(capsys, *command, "--out", str(out))
    assert code == 2 and "not a folder" in err and "Traceback" not in err, err
    assert out.is_dir() is False and (kind != "afile" or out.read_text() == "mine")


def test_a_firmad_error_is_what_every_check_raises(tmp_path):
    with pytest.raises(FirmadError):
        outputs.check_folder(special(tmp_path, "fifo"), "--out")
