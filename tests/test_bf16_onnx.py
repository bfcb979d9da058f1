"""Mixed BF16 ONNX (TensorRT's BF16 graph) and the FP32 stand-in that measures it on a CPU.

Tiny graphs check the arithmetic exactly; the real LiteMedSAM decoder checks that the graph is
strictly typed ONNX every TensorRT 10 parser op accepts in BF16, and that the stand-in is what
the runtime runs for the variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from samedge.doctor import check_graph
from samedge.errors import BackendUnavailableError, BundleError
from samedge.export.tensorrt import build_plan
from samedge.quantize.bf16_onnx import OnnxBf16, bf16_bits, bf16_values, stand_in
from samedge.runtime import Bundle
from samedge.runtime.backends import open_backend

MATRICES = json.loads((Path(__file__).parents[1] / "samedge" /
                       "onnx_tensorrt_operators.json").read_text())["matrices"]


def run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def ort_bf16(values: np.ndarray) -> np.ndarray:
    """ONNX Runtime's own Cast float → bfloat16 → float."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
         helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)], "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(values.shape))])
    return run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
               {"x": values})


def test_bf16_rounding_is_onnx_runtimes_round_to_nearest_even():
    rng = np.random.default_rng(0)
    base = np.float32([1.0, -2.5, 3.0e38, 1e-40])
    ties = (base.view(np.uint32)[:, None] + np.uint32([0x8000, 0x18000])).view(np.float32)
    values = np.concatenate([rng.standard_normal(4000).astype(np.float32) * 100,
                             ties.ravel(), np.float32([0.0, -0.0, np.inf, -np.inf])])
    np.testing.assert_array_equal(bf16_values(values), ort_bf16(values))
    assert bf16_values(np.float32([1 + 2**-8]))[0] == 1.0  # a tie goes to the even neighbour
    assert bf16_values(np.float32([1 + 3 * 2**-8]))[0] == 1 + 2**-6
    assert bf16_bits(np.float32([np.nan]))[0] == 0x7FC0


def linear_block(opset: int = 17):
    """x → Conv-free block: MatMul + bias Add + Gelu-like Mul, a residual Add and a LayerNorm;
    a weight above FP16's range and one FP16 would round differently."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    weight[0, 0], weight[0, 1] = 1.0e5, 1 + 2**-9 + 2**-11  # clipped / double-rounded in FP16
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="/layers.0/blocks.0/fc/MatMul"),
        helper.make_node("Add", ["m", "B"], ["a"], name="/layers.0/blocks.0/fc/Add"),
        helper.make_node("Mul", ["a", "half"], ["h"], name="/layers.0/blocks.0/act/Mul"),
        helper.make_node("Add", ["x", "h"], ["r"], name="/layers.0/blocks.0/residual/Add"),
        helper.make_node("LayerNormalization", ["r", "g", "beta"], ["y"], axis=-1,
                         name="/layers.0/blocks.0/norm/LayerNormalization"),
    ]
    inits = [numpy_helper.from_array(weight, "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"),
             numpy_helper.from_array(np.float32(0.5), "half"),
             numpy_helper.from_array(np.ones(8, np.float32), "g"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    graph = helper.make_graph(nodes, "block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), weight


def test_stand_in_rounds_every_bf16_tensor_and_nothing_else():
    model, weight = linear_block()
    mixed = OnnxBf16(model)
    assert list(mixed.units) == ["/layers.0/blocks.0"]
    kept = mixed.kept(["/layers.0/blocks.0"])
    assert kept["/layers.0/blocks.0/residual/Add"] == "residual add"
    assert kept["/layers.0/blocks.0/norm/LayerNormalization"] == "op type LayerNormalization"
    graph = mixed.graph(["/layers.0/blocks.0"])
    onnx.checker.check_model(graph, full_check=True)  # strictly typed, producers first
    bf16_weight = next(t for t in graph.graph.initializer if t.name == "W")
    assert bf16_weight.data_type == TensorProto.BFLOAT16
    # rounded once, from FP32: not clipped at 65504, not rounded through FP16 first
    bits = np.frombuffer(bf16_weight.raw_data, np.uint16).reshape(8, 8)
    np.testing.assert_array_equal(bits, bf16_bits(weight))
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    r = bf16_values
    bias = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "B"))
    h = r(r(r(r(x) @ r(weight)) + r(bias)) * np.float32(0.5))
    residual = x + h  # FP32 add of the FP32 input and the BF16 branch
    mean = residual.mean(-1, keepdims=True)
    want = (residual - mean) / np.sqrt(residual.var(-1, keepdims=True) + 1e-5)
    got = run(mixed.realize(["/layers.0/blocks.0"]), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # FP32 nodes read FP32 tensors: no round trip through the low type between two of them
    producers = {o: n for n in graph.graph.node for o in n.output}

    def source(name):  # the tensor read, through the Identities that replace round trips
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return name

    residual = next(n for n in graph.graph.node if n.name.endswith("residual/Add"))
    assert source(residual.input[0]) == "x"
    norm = next(n for n in graph.graph.node if n.op_type == "LayerNormalization")
    assert producers[source(norm.input[0])] is residual  # its FP32 output, not rounded
    # no unit in BF16: the stand-in is the FP32 graph, bit for bit
    np.testing.assert_array_equal(run(mixed.realize([]), {"x": x}), run(model, {"x": x}))


def conv_graph(opset: int):
    weight = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="/stem/conv/Conv"),
         helper.make_node("Relu", ["c"], ["y"], name="/stem/act/Relu")], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_ops_without_bf16_at_the_graphs_opset_stay_fp32():
    old = OnnxBf16(conv_graph(17))
    assert old.fixed["/stem/conv/Conv"] == "Conv has no BF16 at opset 17" and not old.units
    onnx.checker.check_model(old.graph([]), full_check=True)
    new = OnnxBf16(conv_graph(22))  # Conv is typed for bfloat16 from opset 22
    assert list(new.units) == ["/stem/conv"]
    graph = new.graph(["/stem/conv"])
    onnx.checker.check_model(graph, full_check=True)
    assert next(t for t in graph.graph.initializer).data_type == TensorProto.BFLOAT16


def test_tensorrt_bf16_needs_strong_typing_and_bf16_tensor_cores():
    plan = build_plan("10.3.0", "bf16", capability="8.7")  # JetPack 6 on Orin
    assert plan.strongly_typed and not plan.builder_flags and not plan.pin_fp32
    assert build_plan("11.4.0", "bf16", capability="9.0").strongly_typed
    with pytest.raises(BackendUnavailableError, match="TensorRT 10 or later"):
        build_plan("8.6.2", "bf16", capability="8.7")
    with pytest.raises(BackendUnavailableError, match="no BF16 tensor cores"):
        build_plan("10.3.0", "bf16", capability="7.2")  # Jetson Xavier
    assert build_plan("10.3.0", "bf16").strongly_typed  # capability unknown: TensorRT decides


# -- the real LiteMedSAM decoder -------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder_bf16(litemedsam_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    mixed = OnnxBf16(litemedsam_bundle / "decoder.onnx")
    graph = mixed.graph(list(mixed.units))
    onnx.save(graph, str(folder / "decoder_bf16.onnx"))
    onnx.save(stand_in(graph), str(folder / "decoder_bf16_cpu_stand_in.onnx"))
    return mixed, folder


def test_bf16_decoder_is_what_tensorrt_10_parses_and_its_stand_in_runs(
        litemedsam_bundle, decoder_bf16, real_slices):
    mixed, folder = decoder_bf16
    path = folder / "decoder_bf16.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    newest = next(m for m in MATRICES if m["matrix"] == "10.0")
    assert check_graph(path, "decoder bf16", newest).problems == []
    old = check_graph(path, "decoder bf16", next(m for m in MATRICES if m["matrix"] == "8.6"))
    assert "data type BFLOAT16 is not supported" in old.problems
    kinds = {n.name: n.op_type for n in mixed.model.graph.node}
    kept = mixed.kept(list(mixed.units))
    assert {kinds[n] for n in kept} >= {"LayerNormalization", "Softmax", "Add"}
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.NotImplemented):
        open_backend("onnxruntime", path, 2)  # why the stand-in exists
    bundle = Bundle(litemedsam_bundle)
    encoder = open_backend("onnxruntime", litemedsam_bundle / "encoder.onnx", 2)
    from samedge.data.prompts import PromptPolicy
    from samedge.quantize.calibset import CalibrationSet

    feeds = list(CalibrationSet(slices=real_slices[:1], augment=False).decoder_inputs(
        bundle.preprocessing, lambda t: encoder.run({"image": t})["image_embeddings"],
        PromptPolicy()))
    fp32 = open_backend("onnxruntime", litemedsam_bundle / "decoder.onnx", 2).run(feeds[0])
    emulated = open_backend("onnxruntime", folder / "decoder_bf16_cpu_stand_in.onnx",
                            2).run(feeds[0])
    want, got = fp32["low_res_masks"], emulated["low_res_masks"]
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-4 < error < 5e-2  # BF16's 8-bit mantissa: visible, not destructive


def test_runtime_runs_the_stand_in_and_verifies_it(bundle_copy, decoder_bf16, real_slices):
    import shutil

    from samedge.export.bundle import BundleWriter
    from samedge.runtime.bundle import seal
    from samedge.runtime.predictor import Predictor

    _, folder = decoder_bf16
    with BundleWriter(bundle_copy) as writer:
        writer.adopt(bundle_copy, Bundle(bundle_copy).artifacts)
        files = [writer.staging / "decoder_bf16.onnx",
                 writer.staging / "decoder_bf16_cpu_stand_in.onnx"]
        for file in files:
            shutil.copy(folder / file.name, file)
        writer.add_artifact("decoder", "onnx", "bf16", files,
                            cpu_stand_in="decoder_bf16_cpu_stand_in.onnx")
        writer.commit({k: v for k, v in Bundle(bundle_copy).manifest.items()
                       if k in ("model", "preprocessing", "graphs")})
    bundle = Bundle(bundle_copy)
    artifact = bundle.find("decoder", "onnxruntime", "bf16")
    assert bundle.run_path(artifact, "onnxruntime").name == "decoder_bf16_cpu_stand_in.onnx"
    assert bundle.run_path(artifact, "tensorrt").name == "decoder_bf16.onnx"
    with pytest.raises(BundleError, match="no bf16 decoder"):  # OpenVINO folds its roundings
        bundle.find("decoder", "openvino", "bf16")
    image = next(s for s in real_slices if s.name == "CT_small.dcm").image
    box = np.array([[40, 40, image.shape[1] - 40, image.shape[0] - 40]])
    masks = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(bundle_copy, backend="onnxruntime", precision="fp32",
                              decoder_precision=precision)
        predictor.set_image(image)
        masks[precision] = predictor.predict(boxes=box).masks[0, 0]
        assert ("stand-in" in predictor.choice.why) == (precision == "bf16")
    overlap = np.logical_and(masks["fp32"], masks["bf16"]).sum()
    assert masks["fp32"].sum() > 100
    assert 2 * overlap / (masks["fp32"].sum() + masks["bf16"].sum()) > 0.95
    # a stand-in the manifest does not hash is refused like any unlisted file
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["precision"] == "bf16":
            a["cpu_stand_in"] = "decoder.onnx.unlisted"
    (bundle_copy / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(BundleError, match="cpu_stand_in"):
        Bundle(bundle_copy)


# -- samedge build: the ONNX variant, then TensorRT engines from its BF16 graph --------------
@pytest.mark.slow
def test_build_bf16_onnx_then_tensorrt_engines_from_the_bf16_graph(
        bundle_copy, real_slices, litemedsam_card, monkeypatch):
    import shutil
    import sys

    import fake_tensorrt  # tests/ is on sys.path

    from samedge.data.prompts import PromptPolicy
    from samedge.quantize import engines
    from samedge.quantize.build import build_variants
    from samedge.quantize.calibset import CalibrationSet
    from samedge.quantize.candidates import SearchOptions
    from samedge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from samedge.validation.gate import GateSet

    validation = [s for s in real_slices if s.name in ("CT_small.dcm", "MR_small.dcm")]
    calib = CalibrationSet(slices=[s for s in real_slices if s.name == "693_J2KI.dcm"],
                           count=2, augment=False)
    result = build_variants(bundle_copy, "bf16", "onnxruntime", ("decoder",), calib, validation,
                            PromptPolicy(), search=SearchOptions(method="none"),
                            card=litemedsam_card, threads=2, report=False)
    assert [c.label() for c in result.added] == ["decoder onnx bf16"], result.lines()
    bundle = Bundle(bundle_copy)
    artifact = bundle.find("decoder", "onnxruntime", "bf16")
    assert artifact["entry"] == "decoder_bf16.onnx"
    assert artifact["cpu_stand_in"] == "decoder_bf16_cpu_stand_in.onnx"
    assert artifact["cpu_stand_in"] in artifact["files"]
    entry = artifact["validation"]["onnxruntime"]
    assert entry["gate"]["passed"] and entry["measured_with"]["decoder"] == "bf16"
    conversion = artifact["conversion"]
    assert conversion["bf16_units"] > 20 and conversion["fp32_reasons"]["residual add"] > 0
    onnx.checker.check_model(onnx.load(str(bundle.entry_path(artifact))), full_check=True)

    # TensorRT 10.3 (fake): the engine is built from the BF16 graph with precision bf16; the
    # stand-in plays the engine on ONNX Runtime so the measuring and committing logic runs
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make("10.3.0"))
    built = []

    def build(onnx_path, engine_path, graph_inputs, precision, options, depth):
        built.append((onnx_path.name, precision))
        source = onnx_path.with_name(onnx_path.stem + "_cpu_stand_in.onnx")
        shutil.copy(source if source.exists() else onnx_path, engine_path)
        sidecar = engine_path.with_suffix(".json")
        sidecar.write_text(json.dumps({"tensorrt_version": "10.3.0", "precision": precision}))
        return [engine_path, sidecar]

    monkeypatch.setattr(engines, "build_engine", build)
    monkeypatch.setattr(engines, "open_backend",
                        lambda name, path, threads=None: OnnxRuntimeBackend(path, threads))
    result = build_variants(bundle_copy, "bf16", "tensorrt", ("decoder",), validation=validation,
                            card=litemedsam_card, gates=GateSet(), report=False)
    assert built[0] == ("decoder_bf16.onnx", "bf16")
    assert "decoder tensorrt_engine bf16" in [c.label() for c in result.added]
    engine = Bundle(bundle_copy).find("decoder", "tensorrt", "bf16")
    assert engine["built_from"] == "decoder_bf16.onnx"
    assert engine["validation"]["tensorrt"]["gate"]["passed"]


def test_cli_refuses_int8_bf16_on_onnx_before_any_work(litemedsam_bundle, capsys):
    from samedge.cli import main

    assert main(["build", str(litemedsam_bundle), "--backend", "onnxruntime",
                 "--precision", "int8-bf16"]) == 2
    out = capsys.readouterr()
    assert "OpenVINO only" in out.err and "calibrating" not in out.out + out.err
