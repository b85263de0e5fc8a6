"""Portable programs of an exported size, loadable without this project's code: a ``torch.export``
program (``model.pt2``, ``torch.export.load``) and an ONNX model (``model.onnx``, run by onnxruntime).

Both are traced from :class:`~deploy.scoring.ScoringModel` with a dynamic batch size and history
length: ``tokens`` (B, L) int64, left-padded with 0 -> ``scores`` (B, N) of items 1..N. History
exclusion and top-k stay with the caller (a masked fill and a top-k). With torch alone::

    import torch
    program = torch.export.load("runs/demo/export/size-64/model.pt2").module()
    scores = program(torch.tensor([[0, 0, 12, 7, 301]]))          # (1, N)

With onnxruntime alone::

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("runs/demo/export/size-64/model.onnx")
    (scores,) = session.run(None, {"tokens": np.array([[0, 0, 12, 7, 301]])})
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import torch

from deploy.artifact import ExportError, fmrl_manifest, join, read_verified
from deploy.scoring import ScoringModel

FILES = {"pt2": "model.pt2", "onnx": "model.onnx"}
"""File name of each portable format in a size's folder."""

_MAX_DIM = 1 << 16


def _example_and_shapes() -> tuple[tuple[torch.Tensor], tuple[dict[int, Any]]]:
    batch = torch.export.Dim("batch", min=1, max=_MAX_DIM)
    length = torch.export.Dim("length", min=1, max=_MAX_DIM)
    example = torch.tensor([[0, 0, 1], [1, 2, 3]], dtype=torch.int64)  # (2, 3), padding included
    return (example,), ({0: batch, 1: length},)


def program_bytes(model: ScoringModel, fmt: str) -> bytes:
    """The ``fmt`` ("pt2" or "onnx") program of ``model`` as the bytes of its file."""
    example, shapes = _example_and_shapes()
    model = model.eval()
    if fmt == "pt2":
        program = torch.export.export(model, example, dynamic_shapes=shapes, strict=False)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return buffer.getvalue()
    if fmt == "onnx":
        # the exporter reports every op it translates at INFO/WARNING: keep the command's output readable
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onnx_program = torch.onnx.export(
            model,
            example,
            input_names=["tokens"],
            output_names=["scores"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
        return onnx_program.model_proto.SerializeToString()
    raise ValueError(f"unknown portable format {fmt!r}: one of {sorted(FILES)}")


class PortableScorer:
    """A loaded portable program: ``scorer(tokens)`` (B, L) int64 -> (B, N) float32 scores."""

    def __init__(self, fmt: str, data: bytes) -> None:
        self.format = fmt
        if fmt == "pt2":
            self._module = torch.export.load(io.BytesIO(data)).module()
        elif fmt == "onnx":
            import onnxruntime  # optional: only ONNX programs need it

            self._session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        else:
            raise ValueError(f"unknown portable format {fmt!r}: one of {sorted(FILES)}")

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.format == "pt2":
            return self._module(tokens)
        (scores,) = self._session.run(None, {"tokens": tokens.long().numpy()})
        return torch.from_numpy(scores)


def load_program(
    url: str, size: int, fmt: str, storage_options: Mapping[str, Any] | None = None
) -> PortableScorer:
    """The ``fmt`` program of size ``size`` of the export at ``url`` (checked against export.json)."""
    manifest = fmrl_manifest(url, storage_options)
    entry = manifest["sizes"].get(str(size))
    if entry is None:
        raise ExportError(f"{url} has no size {size}")
    name = FILES.get(fmt)
    if name is None:
        raise ExportError(f"unknown portable format {fmt!r}: one of {sorted(FILES)}")
    if name not in entry.get("sha256", {}):
        raise ExportError(
            f"{url} size {size} has no {fmt} program: export it with `fmrl export --formats {fmt}`"
        )
    data = read_verified(join(url, entry["folder"], name), entry["sha256"][name], storage_options)
    return PortableScorer(fmt, data)
