"""Upstream mdistiller's released CIFAR-100 teachers, fetched when a run needs one that is missing.

The release is one archive, ``cifar_teachers.tar``, holding ``cifar_teachers/<name>_vanilla/
ckpt_epoch_240.pth`` per teacher; upstream untars it into ``download_ckpts/``. Here it is downloaded
into a temporary folder next to its destination, checked, unpacked there, and each checkpoint moved
into place with a rename: an interrupted or truncated download leaves no teacher file behind.
"""
from __future__ import annotations

import http.client
import os
import posixpath
import shutil
import tarfile
import tempfile

import torch.hub

ARCHIVE_NAME = "cifar_teachers.tar"


class TeacherDownloadError(RuntimeError):
    """The release could not be downloaded or unpacked; the message says what failed."""


def archive_member(path: str) -> tuple[str, str]:
    """``(root, member)`` of a released teacher's path: the folder the archive unpacks into and the
    archive's name for the file (its last three parts, ``cifar_teachers/<name>_vanilla/<file>``)."""
    parent, file_name = os.path.split(path)
    teachers, teacher_dir = os.path.split(parent)
    root, teachers_dir = os.path.split(teachers)
    return root, posixpath.join(teachers_dir, teacher_dir, file_name)


def _unpack(archive: str, member: str, into: str) -> list[str]:
    """The archive's checkpoints under ``member``'s top folder, written below ``into``; their
    archive names. Raises ``TeacherDownloadError`` when the archive is unreadable or lacks ``member``."""
    top = member.split("/", 1)[0] + "/"
    try:
        with tarfile.open(archive) as tar:
            files = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(top)]
            names = [m.name for m in files]
            if member not in names:
                raise TeacherDownloadError(
                    f"the archive does not hold {member} (an incomplete download, or not upstream's {ARCHIVE_NAME})"
                )
            for info in files:
                # Only plain relative names: nothing may land outside `into`.
                if posixpath.isabs(info.name) or ".." in info.name.split("/"):
                    raise TeacherDownloadError(f"the archive holds an unsafe path: {info.name}")
                target = os.path.join(into, *info.name.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)  # tarfile raises ReadError on data cut short
    except (tarfile.TarError, EOFError) as error:
        raise TeacherDownloadError(f"the archive cannot be read ({error}): an interrupted or damaged download") from None
    except OSError as error:  # e.g. a full disk
        raise TeacherDownloadError(f"unpacking the archive failed: {error}") from None
    return names


def download_released_teachers(url: str, path: str) -> None:
    """Download the archive at ``url`` and unpack its checkpoints so that ``path`` (a released
    teacher's location, ``.../cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth``) exists; teachers
    already present are kept. Raises ``TeacherDownloadError``, with nothing written, on failure."""
    root, member = archive_member(path)
    os.makedirs(root, exist_ok=True)
    # The temporary folder is on the same file system as the destination, so the moves are renames.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as scratch:
        archive = os.path.join(scratch, ARCHIVE_NAME)
        print(f"Downloading the released teachers from {url} (for {member})", flush=True)
        try:
            torch.hub.download_url_to_file(url, archive, progress=True)
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise TeacherDownloadError(f"downloading {url} failed: {error or type(error).__name__}") from None
        unpacked = os.path.join(scratch, "unpacked")
        for name in _unpack(archive, member, unpacked):
            target = os.path.join(root, *name.split("/"))
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(unpacked, *name.split("/")), target)
