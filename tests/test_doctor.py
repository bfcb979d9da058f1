"""``samedge doctor``: the bundle's graphs against onnx-tensorrt's documented operator matrix per
TensorRT release, this machine, and whether each engine would load — all without TensorRT."""

from __future__ import annotations

import json

import pytest

from samedge.doctor import check_graph, doctor, operator_matrix, parse_target
from samedge.errors import SamedgeError
from samedge.export.bundle import BundleWriter
from samedge.runtime.bundle import Bundle


def test_matrices_are_chosen_by_release():
    assert operator_matrix("8.5.2")["ref"] == "release/8.5-GA"
    assert operator_matrix("8.6.1")["ref"] == "release/8.6-GA"
    assert operator_matrix("10.3")["ref"] == "10.1-GA"  # newest matrix at or below 10.3
    assert operator_matrix("8.4") is None
    assert not operator_matrix("8.5")["operators"]["LayerNormalization"]["supported"]
    assert operator_matrix("8.6")["operators"]["LayerNormalization"]["supported"]
    assert parse_target("tensorrt-10.3") == "10.3" == parse_target("10.3")
    with pytest.raises(SamedgeError, match="tensorrt-X.Y"):
        parse_target("jetpack-6")


def test_quickstart_bundle_on_tensorrt_8_5_is_refused_for_layernorm(litemedsam_bundle):
    report = doctor(litemedsam_bundle, "tensorrt-8.5")
    assert report.exit_code == 1 and "below samedge's supported range" in report.target_note
    for check in report.checks:
        assert any(p.startswith("LayerNormalization") for p in check.problems), check.label
        assert any("INT64" in n for n in check.notes)  # 8.x casts INT64 down


def test_quickstart_bundle_on_tensorrt_10_3_parses(litemedsam_bundle):
    report = doctor(litemedsam_bundle, "tensorrt-10.3")
    assert report.exit_code == 0 and report.checks
    assert all(not c.problems and c.opset == 17 for c in report.checks)
    text = "\n".join(report.lines())
    assert "onnxruntime" in text and "cpu:" in text and "gpu:" in text


def test_doctor_on_the_command_line(litemedsam_bundle, capsys):
    from samedge.cli import main

    assert main(["doctor", str(litemedsam_bundle), "--target", "tensorrt-8.5"]) == 1
    out = capsys.readouterr().out
    assert "LayerNormalization (×" in out and "WILL NOT PARSE" in out
    assert main(["doctor", str(litemedsam_bundle), "--target", "tensorrt-10.3"]) == 0


def test_engines_in_the_bundle_are_judged_for_here_and_the_target(bundle_copy):
    bundle = Bundle(bundle_copy)
    record = {"tensorrt_version": "10.3.0", "compute_capability": "8.7"}
    with BundleWriter(bundle_copy) as writer:
        writer.adopt(bundle_copy, bundle.artifacts)
        (writer.staging / "tensorrt").mkdir()
        engine = writer.staging / "tensorrt" / "encoder_fp16.engine"
        engine.write_bytes(b"plan")
        engine.with_suffix(".json").write_text(json.dumps(record))
        writer.add_artifact("encoder", "tensorrt_engine", "fp16",
                            [engine, engine.with_suffix(".json")], engine=record)
        writer.commit({k: bundle.manifest[k] for k in ("model", "preprocessing", "graphs")})
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        here = "no TensorRT installed here"
    else:
        pytest.skip("TensorRT present: the verdict depends on it")
    (label, verdict, _), = doctor(bundle_copy).engines
    assert verdict == here and "10.3.0" in label
    assert doctor(bundle_copy, "tensorrt-10.3").engines[0][2].startswith("version matches")
    assert "plain engine" in doctor(bundle_copy, "tensorrt-10.13").engines[0][2]


def test_qdq_with_a_nonzero_zero_point_is_reported(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4])], inits)
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    check = check_graph(path, "toy", operator_matrix("10.3"))
    assert check.problems == ["2 Q/DQ nodes with a nonzero zero point (must be 0), e.g. q"]
