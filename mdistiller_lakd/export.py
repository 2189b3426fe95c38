"""A trained student taken out of the package: its logits function exported to a format that loads
with plain torch or onnxruntime, and checked against the student before it is written.

Formats: ``pt2`` (``torch.export``, read with ``torch.export.load``), ``torchscript``
(``torch.jit.trace``, read with ``torch.jit.load``) and ``onnx`` (``torch.onnx``'s exporter, read
with onnxruntime). All three record the operations the student's forward runs, forward hooks
included, so LAKD's NDAM (attached by hooks) is part of the exported graph. The batch dimension is
dynamic; the image size is fixed to the dataset's. Exports are made on the CPU, in fp32.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .dataset.cifar import LAYOUTS
from .engine.checkpoint import CheckpointError

IMAGE_SIZE = {**{name: 32 for name in LAYOUTS}, "tiny_imagenet": 64, "imagenet": 224}
NUM_CLASSES = {**{name: layout.num_classes for name, layout in LAYOUTS.items()}, "tiny_imagenet": 200, "imagenet": 1000}
# The example batch traced (not 1, which torch.export would specialise); the checks use other batch
# sizes, so an export with the batch size baked in fails them.
EXPORT_BATCH = 2
_ONNX_INPUT, _ONNX_OUTPUT = "image", "logits"

Runner = Callable[[torch.Tensor], torch.Tensor]


class ExporterMissingError(ImportError):
    """The exporter of the chosen format needs packages that are not installed; the message says which."""


class StudentLogits(nn.Module):
    """The logits of a zoo model, which returns ``(logits, feats)``: what a deployment runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)[0]


def check_student_checkpoint(checkpoint: dict, path: str) -> None:
    """Refuse a training checkpoint (``latest``, ``best``, ``epoch_N``: the whole distiller). Its
    student weights could be read, but not the student's NDAM settings, so an export of it would
    silently be another network than the trained one."""
    state = checkpoint.get("model", checkpoint)
    if "optimizer" in checkpoint or any(key.startswith(("student.", "module.student.")) for key in state):
        raise CheckpointError(
            f"{path} is a training checkpoint (the whole distiller), not a student checkpoint; export "
            "the run's student_best (or student_latest, student_N), which holds the student as it was trained"
        )


def example_images(dataset: str, batch: int, seed: int = 0) -> torch.Tensor:
    """A batch of normal random images of the dataset's shape (the inputs are normalised images)."""
    size = IMAGE_SIZE[dataset]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch")}


def _export_pt2(model: nn.Module, example: torch.Tensor) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _load_pt2(data: bytes) -> Runner:
    return torch.export.load(io.BytesIO(data)).module()


@contextlib.contextmanager
def _torchscript_deprecation_silenced():
    """torch warns that TorchScript is deprecated at each call; the format is asked for, keep the output clean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.\w+` is deprecated")
        yield


def _export_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    # Tracing, not scripting: scripting skips Python forward hooks (NDAM) and the zoo's Python code.
    with _torchscript_deprecation_silenced():
        torch.jit.save(torch.jit.trace(model, example), buffer)
    return buffer.getvalue()


def _load_torchscript(data: bytes) -> Runner:
    with _torchscript_deprecation_silenced():
        return torch.jit.load(io.BytesIO(data))


def _export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=(_batch_dim(),), verbose=False,
            input_names=[_ONNX_INPUT], output_names=[_ONNX_OUTPUT],
        )
    except ImportError as error:
        raise ExporterMissingError(
            f"--format onnx: torch's ONNX exporter needs onnx and onnxscript ({error}); install them with "
            'pip install -e ".[onnx]"'
        ) from None
    # The weights inside the one file (the exporter's default puts them beside it, in OUT.data).
    return program.model_proto.SerializeToString()


def _load_onnx(data: bytes) -> Runner | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run([_ONNX_OUTPUT], {_ONNX_INPUT: images.numpy()})[0])


@dataclass(frozen=True)
class ExportFormat:
    export: Callable[[nn.Module, torch.Tensor], bytes]  # the file's bytes
    load: Callable[[bytes], Runner | None]  # None: its runtime is not installed here
    how_to_load: str


FORMATS = {
    "pt2": ExportFormat(_export_pt2, _load_pt2, "torch.export.load(OUT).module()(images)"),
    "torchscript": ExportFormat(_export_torchscript, _load_torchscript, "torch.jit.load(OUT)(images)"),
    "onnx": ExportFormat(
        _export_onnx, _load_onnx,
        f'onnxruntime.InferenceSession(OUT).run(["{_ONNX_OUTPUT}"], {{"{_ONNX_INPUT}": images}})[0]',
    ),
}


@dataclass(frozen=True)
class Agreement:
    """How an export's logits compare with the student's on some images."""

    images: int
    max_difference: float  # the largest absolute logit difference
    top1_agreement: float  # percent of images with the same top-1 class


@torch.no_grad()
def compare(student: Runner, exported: Runner, batches: Iterable[torch.Tensor]) -> Agreement:
    images, max_difference, same_top1 = 0, 0.0, 0
    for batch in batches:
        expected, got = student(batch), exported(batch)
        max_difference = max(max_difference, (expected - got).abs().max().item())
        same_top1 += (expected.argmax(1) == got.argmax(1)).sum().item()
        images += len(batch)
    return Agreement(images, max_difference, 100.0 * same_top1 / images)
