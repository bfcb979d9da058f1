"""Exporting a module to ONNX and checking the graph against PyTorch on real inputs.

SAM's einsum-based relative-position term is swapped for batched MatMul during export (TensorRT
and OpenVINO take MatMul everywhere); export-only rewrites live in ``rewrites.py``, not in model
code, as segment-anything keeps them in ``utils/onnx.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from samedge.errors import ExportError
from samedge.export.graphs import GraphSpec

OPSET = 17


# -- encoder ------------------------------------------------------------------------------------
def _rel_pos_matmul(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
    """segment-anything's ``add_decomposed_rel_pos`` with the two einsums written as MatMul.

    TensorRT supports only some einsum equations; ``bhwc,hkc->bhwk`` is a batched matmul over h
    (and over w for the second term), which every engine runs natively.
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, c)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, c)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.matmul(r_q.permute(1, 0, 2, 3).reshape(q_h, b * q_w, dim), rh.transpose(1, 2))
    rel_h = rel_h.reshape(q_h, b, q_w, k_h).permute(1, 0, 2, 3)  # (b, q_h, q_w, k_h)
    rel_w = torch.matmul(r_q.permute(2, 0, 1, 3).reshape(q_w, b * q_h, dim), rw.transpose(1, 2))
    rel_w = rel_w.reshape(q_w, b, q_h, k_w).permute(1, 2, 0, 3)  # (b, q_h, q_w, k_w)
    attn = attn.view(b, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(b, q_h * q_w, k_h * k_w)


@contextlib.contextmanager
def export_patches():
    """Swap einsum rel-pos for MatMul while tracing segment-anything ViT encoders."""
    try:
        from segment_anything.modeling import image_encoder as vit
    except ImportError:  # LiteMedSAM-only installs have nothing to patch
        yield
        return
    original = vit.add_decomposed_rel_pos
    vit.add_decomposed_rel_pos = _rel_pos_matmul
    try:
        yield
    finally:
        vit.add_decomposed_rel_pos = original


# -- export and validation ----------------------------------------------------------------------
def export_graph(module: nn.Module, spec: GraphSpec, example: tuple, path: Path) -> Path:
    """Trace ``module`` to ONNX at ``path`` with the spec's names and dynamic axes.

    What is traced is ``rewrites.export_ready(module)``: the same function, re-shaped for the
    engines (TinyViT encoder, prompt decoder; anything else unchanged). Validation compares the
    graph with ``module`` itself.
    """
    from samedge.export.rewrites import export_ready

    with torch.no_grad():
        traced = export_ready(module)
    with warnings.catch_warnings(), export_patches(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                traced, example, str(path),
                input_names=list(spec.inputs), output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes, opset_version=OPSET,
                do_constant_folding=True, dynamo=False,
            )
        except Exception as exc:  # the exporter raises many types; keep the cause attached
            raise ExportError(f"ONNX export of the {spec.name} graph failed: {exc}") from exc
    _simplify(path)
    return path


def _simplify(path: Path) -> None:
    """Fold constants and fuse trivial chains with onnxslim; keep the graph if it cannot."""
    try:
        import onnxslim
    except ImportError:
        return
    import onnx

    try:
        slim = onnxslim.slim(str(path))
    except Exception:  # onnxslim is an optimisation only; validation judges the result
        return
    onnx.save(slim, str(path))


def validate_graph(
    path: Path,
    spec: GraphSpec,
    reference: Callable[..., tuple],
    cases: Iterable[dict[str, np.ndarray]],
) -> dict:
    """Run the ONNX graph in ONNX Runtime on each case and compare with ``reference`` (torch).

    Returns per-output worst absolute error and the number of cases; raises ExportError when any
    output leaves its declared tolerance, so a bad graph never reaches a bundle.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = {name: 0.0 for name in spec.outputs}
    count = 0
    for case in cases:
        got = dict(zip(spec.outputs, session.run(None, case)))
        with torch.no_grad():
            expected = reference(*(torch.tensor(case[n]) for n in spec.inputs))
        for name, ref in zip(spec.outputs, expected):
            ref = ref.detach().numpy()
            if got[name].shape != ref.shape:
                raise ExportError(
                    f"{spec.name}: output {name} has shape {got[name].shape} in ONNX but "
                    f"{ref.shape} in PyTorch"
                )
            worst[name] = max(worst[name], float(np.abs(got[name] - ref).max()))
            tol = spec.tolerances[name]
            if tol.exceeded(got[name], ref):
                raise ExportError(
                    f"{spec.name}: ONNX output {name} differs from PyTorch by up to "
                    f"{worst[name]:.3g} (declared tolerance atol={tol.atol}, rtol={tol.rtol})",
                    hint="this is a bug in the export; report it with the model family",
                )
        count += 1
    return {"cases": count, "max_abs_error": worst}
