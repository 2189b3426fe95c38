"""Scalars out of a run's tensorboard event files, read with tensorboardX's own protobufs.

An event file is a sequence of TFRecords (length, its CRC, an ``Event`` protobuf, its CRC). The
reader needs no ``tensorboard`` package; it stops quietly at a record cut short by a run that is
still writing.
"""
from __future__ import annotations

import glob
import os
import struct
import warnings

from google.protobuf.message import DecodeError
from tensorboardX.proto.event_pb2 import Event

_HEADER = struct.Struct("<QI")  # record length, masked CRC of the length
_FOOTER_SIZE = 4  # masked CRC of the data

Curve = list[tuple[int, float]]  # (step, value), by step


def event_files(path: str) -> list[str]:
    """The event files of a run folder (searched recursively, e.g. ``train.events/``) or ``path`` itself."""
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(os.path.join(path, "**", "*tfevents*"), recursive=True))


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    position = 0
    while position + _HEADER.size <= len(data):
        length, _ = _HEADER.unpack_from(data, position)
        start = position + _HEADER.size
        end = start + length
        if end + _FOOTER_SIZE > len(data):
            return  # the last record is still being written
        yield data[start:end]
        position = end + _FOOTER_SIZE


def _scalar(value) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return value.simple_value
    if kind == "tensor" and (value.tensor.float_val or value.tensor.double_val):
        return (list(value.tensor.float_val) or list(value.tensor.double_val))[0]
    return None


def read_scalars(path: str) -> dict[str, Curve]:
    """Every scalar tag of the event files under ``path``: ``{tag: [(step, value), ...]}``.

    A run resumed after a kill writes a new event file and logs some steps again; for a step logged
    more than once the value written last (by wall time) wins.
    """
    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall time, value)
    for file in event_files(path):
        try:
            for record in _records(file):
                event = Event.FromString(record)
                if event.WhichOneof("what") != "summary":
                    continue
                for value in event.summary.value:
                    scalar = _scalar(value)
                    if scalar is None:
                        continue
                    steps = latest.setdefault(value.tag, {})
                    if event.step not in steps or steps[event.step][0] <= event.wall_time:
                        steps[event.step] = (event.wall_time, scalar)
        except DecodeError as error:
            warnings.warn(f"{file}: unreadable event record, the rest of the file is skipped ({error})")
    return {tag: sorted((step, value) for step, (_, value) in steps.items()) for tag, steps in latest.items()}
