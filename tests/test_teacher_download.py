"""The released CIFAR-100 teacher is downloaded when missing: from a local HTTP server serving an
archive in upstream's layout, through tools/train.py in a fresh working directory; a truncated or
interrupted download leaves no teacher file and says what failed and what to do."""
import glob
import http.server
import io
import os
import runpy
import tarfile
import threading

import pytest
import torch

from conftest import REPO_ROOT
from released_teacher import save_released_checkpoint
from mdistiller_lakd.engine.cfg import load_cfg
from mdistiller_lakd.engine.checkpoint import load_checkpoint
from mdistiller_lakd.engine.download import archive_member
from mdistiller_lakd.models import cifar_model_dict

MEMBER = "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"


def teacher_state() -> dict:
    torch.manual_seed(0)
    return cifar_model_dict["resnet8"][0](num_classes=100).state_dict()


def released_checkpoint() -> bytes:
    """A resnet8 teacher saved as upstream's release is (from DataParallel, with its metadata)."""
    buffer = io.BytesIO()
    save_released_checkpoint(teacher_state(), buffer)
    return buffer.getvalue()


def tar_bytes(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``routes[path] = (body, declared length)``: a declared length above the body's is a
    connection cut mid-download."""

    def do_GET(self):
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, length = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    return released_checkpoint()


@pytest.fixture(scope="module")
def server(checkpoint):
    good = tar_bytes({MEMBER: checkpoint, "cifar_teachers/resnet14_vanilla/ckpt_epoch_240.pth": b"other"})
    cut = good.index(checkpoint) + len(checkpoint) // 2  # inside the needed checkpoint
    other = tar_bytes({"cifar_teachers/vgg13_vanilla/ckpt_epoch_240.pth": b"x"})
    routes = {
        "/good.tar": (good, len(good)),
        "/truncated.tar": (good[:cut], cut),
        "/interrupted.tar": (good[:cut], len(good)),
        "/other.tar": (other, len(other)),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Routes", (Handler,), {"routes": routes}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fresh(tmp_path, monkeypatch, cifar100_root):
    """A fresh working directory, and resnet8's released-teacher location in an empty repository."""
    teacher = tmp_path / "repo" / "download_ckpts" / MEMBER
    monkeypatch.setitem(cifar_model_dict, "resnet8", (cifar_model_dict["resnet8"][0], str(teacher)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return {"teacher": teacher, "root": cifar100_root, "prefix": str(tmp_path / "out")}


def train_kd(fresh, url: str) -> int:
    train_main = runpy.run_path(os.path.join(REPO_ROOT, "tools", "train.py"))["main"]
    return train_main([
        "--cfg", os.path.join(REPO_ROOT, "configs", "cifar100", "vanilla", "resnet20.yaml"),
        "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_URL", url, "DATASET.ROOT", fresh["root"], "DATASET.NUM_WORKERS", "0",
        "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "32", "LOG.PREFIX", fresh["prefix"],
    ])


def test_default_url_is_upstreams_checkpoints_release():
    assert load_cfg(None, []).DISTILLER.TEACHER_URL == (
        "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
    )


def test_archive_member_is_upstreams_layout():
    root, member = archive_member(cifar_model_dict["resnet56"][1])
    assert member == "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"
    assert root == os.path.join(REPO_ROOT, "download_ckpts")  # under the repository root, any cwd


def test_missing_teacher_is_downloaded_and_training_runs(fresh, server, checkpoint, capsys):
    assert train_kd(fresh, server + "/good.tar") == 0
    assert fresh["teacher"].read_bytes() == checkpoint
    download_root = fresh["teacher"].parents[2]
    assert sorted(os.listdir(download_root)) == ["cifar_teachers"]  # no archive or temporary folder left
    assert (download_root / "cifar_teachers" / "resnet14_vanilla" / "ckpt_epoch_240.pth").read_bytes() == b"other"
    assert os.listdir(".") == []  # nothing in the working directory
    assert "Downloading the released teachers from " + server + "/good.tar" in capsys.readouterr().out
    [latest] = glob.glob(os.path.join(fresh["prefix"], "*", "*", "latest"))
    state, trained = teacher_state(), load_checkpoint(latest)["model"]
    assert all(torch.equal(trained["teacher." + key], state[key]) for key in state)  # the released teacher


@pytest.mark.parametrize("archive, failure", [
    ("/truncated.tar", "the archive cannot be read"),
    ("/interrupted.tar", "the archive cannot be read"),  # torch.hub keeps what came
    ("/other.tar", f"the archive does not hold {MEMBER}"),
    ("/missing.tar", "HTTP Error 404"),
])
def test_a_failed_download_leaves_no_teacher_and_says_what_to_do(fresh, server, archive, failure, capsys):
    assert train_kd(fresh, server + archive) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"teacher checkpoint for 'resnet8' not found: {fresh['teacher']}" in err and failure in err
    assert "no teacher file was written" in err and "run the command again" in err
    assert "cifar_teachers.tar" in err and "DISTILLER.TEACHER_CKPT" in err
    download_root = fresh["teacher"].parents[2]
    assert not os.path.exists(fresh["teacher"]) and os.listdir(download_root) == []
    assert not os.path.exists(fresh["prefix"])  # stopped before training
