"""Bad weight files: one error naming the file, never a traceback or a silent wrong result, never an unpickle by
default; a recorded arch that contradicts the tensors is a warning naming both."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import moco_zoo  # noqa: F401  (registers the zoo with timm)
from moco_zoo.checkpoint import CheckpointError, safe_torch_load
from moco_zoo.cli import main


@pytest.fixture()
def bad_files(tmp_path):
    files = {"random.bin": bytes(range(256)) * 20, "truncated_pickle.pth": b"\x80\x04\x95garbage",
             "text.pth": b"# not a checkpoint\n" * 10}
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    good = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    (tmp_path / "truncated_zip.pth").write_bytes(good.read_bytes()[:5000])
    out["truncated_zip.pth"] = tmp_path / "truncated_zip.pth"
    return out


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_convert_names_the_file_in_one_line(bad_files, tmp_path, capsys, allow_pickle):
    for name, path in bad_files.items():
        argv = ["convert", str(path), "--to", "timm", "--out", str(tmp_path / "o.safetensors")]
        assert main(argv + (["--allow-pickle"] if allow_pickle else [])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}:" in err and "Traceback" not in err, err
        if name in ("random.bin", "text.pth"):  # not a pickle at all: no advice to allow unpickling
            assert "not a PyTorch checkpoint" in err and "allow-pickle" not in err


def test_timm_file_overlay_names_the_bad_file(bad_files):
    for name, path in bad_files.items():
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            timm.create_model("moco_r18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_safe_load_refuses_real_pickles_unless_allowed(tmp_path):
    import pickle

    path = tmp_path / "obj.pth"
    path.write_bytes(pickle.dumps({"w": torch.zeros(1), "cls": CheckpointError}))  # a class: needs full unpickling
    with pytest.raises(CheckpointError, match="obj.pth: refusing to unpickle"):
        safe_torch_load(path)


def test_recorded_arch_contradicting_the_tensors_warns_naming_both(tmp_path):
    from moco_zoo.convert import to_canonical

    path = tmp_path / "lying.pth"
    torch.save({"arch": "resnet50", "state_dict": torchvision.models.resnet18().state_dict()}, path)
    with pytest.warns(UserWarning, match="records arch 'resnet50' but its tensors are those of 'resnet18'"):
        assert to_canonical(path).arch == "resnet18"


def test_debug_shows_the_traceback(bad_files):
    with pytest.raises(CheckpointError, match="random.bin"):
        main(["--debug", "convert", str(bad_files["random.bin"]), "--to", "timm", "--out", "x.safetensors"])
