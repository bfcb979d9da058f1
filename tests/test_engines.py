"""Engines are measured, never inherited: ``build --backend tensorrt``'s measuring and committing
logic run on CPU with the TensorRT builder and runtime replaced by stand-ins that build and run
the ONNX graph itself (optionally corrupted), so what is tested is what samedge does with an
engine, not TensorRT. Plus the torch-free FP32 reference used on devices without PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from samedge.data.prompts import PromptPolicy
from samedge.export.bundle import BundleWriter
from samedge.export.tensorrt import EngineOptions
from samedge.quantize import engines
from samedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
from samedge.runtime.bundle import Bundle
from samedge.validation import references
from samedge.validation.drift import dice
from samedge.validation.gate import GateSet

ENGINE = "tensorrt_engine"


@pytest.fixture
def fp16_bundle(bundle_copy):
    """The LiteMedSAM bundle with a decoder 'fp16' ONNX graph (a copy of the FP32 one: what the
    engine does to it is what is measured)."""
    bundle = Bundle(bundle_copy)
    with BundleWriter(bundle_copy) as writer:
        writer.adopt(bundle_copy, bundle.artifacts)
        copy = writer.staging / "decoder_fp16.onnx"
        shutil.copy(bundle_copy / "decoder.onnx", copy)
        writer.add_artifact("decoder", "onnx", "fp16", [copy])
        writer.commit({k: bundle.manifest[k] for k in ("model", "preprocessing", "graphs")})
    return bundle_copy


class Corrupted:
    """An 'engine' whose masks are the negated logits: what a broken FP16 kernel could do."""

    def __init__(self, inner):
        self.inner, self.name = inner, "tensorrt"
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, inputs):
        out = self.inner.run(inputs)
        return {**out, "low_res_masks": -out["low_res_masks"]}


@pytest.fixture
def fake_tensorrt_build(monkeypatch):
    """Builder: the 'engine' is the source graph's bytes plus a sidecar; runtime: ONNX Runtime
    on it, corrupted for the graphs named in ``corrupt``."""
    corrupt: set[str] = set()
    built: list[tuple[str, str]] = []

    def build(onnx_path, engine_path, graph_inputs, precision, options, depth):
        built.append((engine_path.stem, precision))
        shutil.copy(onnx_path, engine_path)
        sidecar = engine_path.with_suffix(".json")
        sidecar.write_text(json.dumps({"tensorrt_version": "10.3.0", "precision": precision}))
        return [engine_path, sidecar]

    def open_backend(name, path, threads=None):
        assert name == "tensorrt"
        backend = OnnxRuntimeBackend(path, threads)
        return Corrupted(backend) if path.stem.split("_")[0] in corrupt else backend

    monkeypatch.setattr(engines, "build_engine", build)
    monkeypatch.setattr(engines, "open_backend", open_backend)
    return corrupt, built


def _build(bundle, card, real_slices):
    items = [s for s in real_slices if s.name in ("CT_small.dcm", "MR_small.dcm")]
    return engines.build_engines(bundle, "fp16", ("decoder",), items, PromptPolicy(), GateSet(),
                                 EngineOptions(), card=card, report=False)


def test_an_engine_earns_its_own_verdict(fp16_bundle, fake_tensorrt_build, litemedsam_card,
                                         real_slices):
    _, built = fake_tensorrt_build
    result = _build(fp16_bundle, litemedsam_card, real_slices)
    assert built == [("decoder_fp16", "fp16"), ("encoder_fp32", "fp32")]  # + the FP32 partner
    bundle = Bundle(fp16_bundle)
    engine = next(a for a in bundle.artifacts if (a["graph"], a["format"], a["precision"]) ==
                  ("decoder", ENGINE, "fp16"))
    own = engine["validation"]["tensorrt"]
    assert own["gate"]["passed"] and own["reference"] == references.PYTORCH_REFERENCE
    assert own["measured_with"]["decoder"] == "fp16 engine"
    assert len(own["per_prompt"]) == 2 * 5  # 5 auto boxes on each of the 2 slices
    assert engine["validation_combined"]["measured_with"] == {"encoder": "fp32 engine",
                                                              "decoder": "fp16 engine"}
    assert engine["built_from"] == "decoder_fp16.onnx"
    partner = next(a for a in bundle.artifacts if (a["graph"], a["format"]) ==
                   ("encoder", ENGINE))
    assert partner["precision"] == "fp32" and "gate" not in partner["validation"]["tensorrt"]
    assert {c.label() for c in result.added} == {"decoder tensorrt_engine fp16",
                                                 "encoder tensorrt_engine fp32"}


def test_an_engine_that_fails_its_gate_is_not_committed(fp16_bundle, fake_tensorrt_build,
                                                        litemedsam_card, real_slices):
    corrupt, _ = fake_tensorrt_build
    corrupt.add("decoder")
    result = _build(fp16_bundle, litemedsam_card, real_slices)
    assert not result.added and [c.label() for c in result.rejected] == [
        "decoder tensorrt_engine fp16"]
    assert "mean Dice" in result.rejected[0].why_out()
    bundle = Bundle(fp16_bundle)
    assert not [a for a in bundle.artifacts if a["format"] == ENGINE]
    assert not (fp16_bundle / "tensorrt" / "decoder_fp16.engine").exists()
    assert bundle.manifest["builds"][-1]["rejected"][0]["variant"] == \
        "decoder tensorrt_engine fp16"


def test_runtime_references_match_pytorch(litemedsam_bundle, litemedsam_card, real_slices):
    """The torch-free reference (FP32 ONNX on ONNX Runtime CPU) agrees with FP32 PyTorch."""
    from samedge.progress import Steps
    from samedge.validation.references import references_for

    items = [s for s in real_slices if s.name == "CT_small.dcm"]
    policy = PromptPolicy()
    ours = references.runtime_references(Bundle(litemedsam_bundle), items, policy, Steps(True))
    torch = references_for(litemedsam_card, items, policy, Steps(True))
    (got, _), (want, _) = ours.references[0], torch.references[0]
    for index in range(len(want.box_logits)):
        assert dice(got.box_logits[index, 0] > 0, want.box_logits[index, 0] > 0) > 0.995
    cosine = float(np.sum(got.embedding * want.embedding)
                   / np.linalg.norm(got.embedding) / np.linalg.norm(want.embedding))
    assert cosine > 0.9999


def test_validate_tensorrt_without_tensorrt_stops_before_the_reference(litemedsam_bundle,
                                                                        capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT present")
    except ImportError:
        pass
    from samedge.cli import main

    assert main(["--quiet", "validate", str(litemedsam_bundle), "--backend", "tensorrt"]) == 2
    assert "TensorRT is not importable" in capsys.readouterr().err


def test_build_backend_tensorrt_reuses_the_bundles_onnx_graph(fp16_bundle, fake_tensorrt_build,
                                                              litemedsam_card, real_slices,
                                                              monkeypatch):
    """``build --backend tensorrt`` on a bundle that already holds the gated FP16 ONNX graph (as
    a workstation's ``--backend onnxruntime`` leaves it) goes straight to the engines."""
    import sys

    import fake_tensorrt

    from samedge.quantize.build import build_variants

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("10.3.0"))
    before = next(a for a in Bundle(fp16_bundle).artifacts if a["format"] == "onnx"
                  and a["precision"] == "fp16")
    items = [s for s in real_slices if s.name == "CT_small.dcm"]
    result = build_variants(fp16_bundle, "fp16", "tensorrt", ("decoder",), validation=items,
                            card=litemedsam_card, report=False)
    assert [c.label() for c in result.added] == ["decoder tensorrt_engine fp16",
                                                 "encoder tensorrt_engine fp32"]
    after = next(a for a in Bundle(fp16_bundle).artifacts if a["format"] == "onnx"
                 and a["precision"] == "fp16")
    assert after["files"] == before["files"]  # not rebuilt
