"""Reduced precision that holds and pays: the default chosen by a speed advantage that survives
load (a deterministic fake clock stands in for the shared cores), the runtime's fallback on a CPU
without the default's instructions, the half-allowance margin, and BF16 variants from build to
runtime on the real OpenVINO API."""

from __future__ import annotations

import itertools
import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
from drift_fakes import fake_drift  # tests/ is on sys.path

from samedge.errors import PrecisionUnsupportedError
from samedge.export.bundle import write_manifest
from samedge.runtime.bundle import Bundle
from samedge.runtime.variants import choose_variant, speed_needs
from samedge.speed.selection import (
    FASTER,
    NOT_FASTER,
    UNCLEAR,
    SelectionRule,
    compare,
    select,
)
from samedge.speed.timing import interleaved
from samedge.validation.gate import DEFAULT_GATES, GateSet, with_margin


# -- a deterministic clock: each call advances it by the seconds scripted for that variant --------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def call(self, seconds):
        """A call whose successive runs take ``seconds`` (an iterable) on this clock."""
        durations = iter(seconds)

        def run():
            self.now += next(durations)
        return run


def scripted(clock: FakeClock, encoder: dict[str, list[float]], decode_s: float = 0.03):
    """``time_rounds`` for :func:`select` over ``interleaved`` with the fake clock: per label the
    encoder seconds of each call (warm-up first), the decoder a constant."""
    calls = {label: [clock.call(iter(times)), clock.call(itertools.repeat(decode_s))]
             for label, times in encoder.items()}
    labels = list(encoder)
    log = {"rounds": []}

    def time_rounds(count: int, first: bool):
        samples = interleaved([calls[label] for label in labels], count,
                              warmup=1 if first else 0, clock=clock, sleep=lambda s: None)
        log["rounds"].append(count)
        return {label: [e + d for e, d in zip(*samples[i])] for i, label in enumerate(labels)}

    return time_rounds, log


def old_rule(encoder: dict[str, list[float]], repeats: int = 3) -> str:
    """The rule this replaces: medians of 3 rounds, the fastest unless within 5 % of FP32."""
    medians = {label: statistics.median(times[1:1 + repeats]) for label, times in encoder.items()}
    fastest = min(medians, key=medians.get)
    return fastest if medians[fastest] <= 0.95 * medians["fp32"] else "fp32"


def test_a_load_burst_on_fp32_no_longer_makes_int8_the_default():
    """The issue's noisy run: other work on the cores during FP32's calls made a variant 4 %
    faster look 20 % faster on medians of 3 rounds. The paired and best-round views both see
    4 %: FP32 stays, as on a quiet machine."""
    burst = 0.6
    encoder = {"fp32": [0.55, 0.55 + burst, 0.55 + burst, 0.55, 0.55, 0.55],
               "int8": [0.53] * 6}
    assert old_rule(encoder) == "int8"  # what the pipeline did before
    clock = FakeClock()
    time_rounds, log = scripted(clock, encoder)
    selection = select(time_rounds, ["fp32", "int8"])
    assert selection.choice == "fp32" and log["rounds"] == [5] and not selection.retimed
    (comparison,) = selection.comparisons
    assert comparison.verdict == NOT_FASTER
    assert comparison.best_ratio == pytest.approx(0.56 / 0.58)


def test_a_real_advantage_survives_bursts_on_the_faster_variant():
    """BF16 at half FP32's time (the Xeon's 290 vs 578 ms) with load on two of its rounds."""
    encoder = {"fp32": [0.578] * 6, "bf16": [0.29, 0.29, 0.95, 0.29, 0.29, 0.29]}
    selection = select(scripted(FakeClock(), encoder)[0], ["fp32", "bf16"])
    assert selection.choice == "bf16"
    assert selection.comparisons[0].verdict == FASTER
    assert selection.comparisons[0].paired_ratio == pytest.approx(0.32 / 0.608)


def test_disagreeing_rounds_are_retimed_then_decided():
    """Bursts on the candidate in 2 of the first 5 rounds: best round and paired median say
    faster, but it won only 3 of 5 rounds; 4 more rounds, quiet, settle it."""
    encoder = {"fp32": [0.60] * 10,
               "int8": [0.45, 0.45, 0.9, 0.9, 0.45, 0.45] + [0.45] * 4}
    time_rounds, log = scripted(FakeClock(), encoder)
    selection = select(time_rounds, ["fp32", "int8"])
    assert log["rounds"] == [5, 4] and selection.retimed and selection.rounds == 9
    assert selection.choice == "int8" and selection.comparisons[0].wins == pytest.approx(7 / 9)
    first = compare([0.48] * 3 + [0.93] * 2, [0.63] * 5, SelectionRule())
    assert first.verdict == UNCLEAR and first.wins == pytest.approx(0.6)


def test_still_unclear_at_the_round_limit_keeps_the_more_precise():
    encoder = {"fp32": [0.60] * 14, "int8": [0.50] + [0.50, 0.9] * 7}
    rule = SelectionRule(max_rounds=9)
    time_rounds, log = scripted(FakeClock(), encoder)
    selection = select(time_rounds, ["fp32", "int8"], rule)
    assert sum(log["rounds"]) == 9 and selection.unclear and selection.choice == "fp32"
    evidence = selection.evidence(rule)
    assert evidence["rounds"] == 9 and evidence["retimed"] and \
        evidence["comparisons"][0]["verdict"] == UNCLEAR


def test_a_small_advantage_does_not_trade_precision_away():
    """INT8+BF16 is 7 % faster than BF16 (both ~2× FP32): BF16, the more precise, is the default."""
    encoder = {"fp32": [0.578] * 6, "bf16": [0.290] * 6, "int8-bf16": [0.270] * 6}
    selection = select(scripted(FakeClock(), encoder)[0], ["fp32", "bf16", "int8-bf16"])
    assert selection.choice == "bf16"
    assert [c.verdict for c in selection.comparisons] == [FASTER, NOT_FASTER]
    assert sorted(selection.faster_than_reference("fp32", SelectionRule())) == \
        ["bf16", "int8-bf16"]


def test_selection_rule_rejects_nonsense():
    with pytest.raises(ValueError):
        SelectionRule(margin=0.0)
    with pytest.raises(ValueError):
        SelectionRule(rounds=20, max_rounds=13)
    with pytest.raises(ValueError):
        compare([0.1], [0.1, 0.2], SelectionRule())


# -- the runtime's fallback on a CPU without the default's instructions -------------------------------
def _bundle(default: dict, precisions=("fp32", "int8", "bf16")):
    artifacts = [{"graph": g, "format": f, "precision": p}
                 for g in ("encoder", "decoder") for p in precisions
                 for f in (("onnx", "openvino_ir") if p == "fp32" else ("openvino_ir",))]
    return SimpleNamespace(manifest={"default_variant": default}, artifacts=artifacts)


AVX2 = frozenset({"avx2", "fma"})
VNNI = frozenset({"avx2", "fma", "avx512f", "avx512_vnni"})
AMX = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})


def test_default_built_on_amx_falls_back_on_an_avx2_laptop():
    default = {"backend": "openvino", "precision": "bf16", "decoder_precision": "fp32",
               "cpu": {"name": "Intel(R) Xeon(R) Platinum 8480+"},
               "fallbacks": [{"backend": "openvino", "precision": "int8",
                              "decoder_precision": "fp32"},
                             {"backend": "openvino", "precision": "fp32",
                              "decoder_precision": "fp32"}]}
    bundle = _bundle(default)
    on_amx = choose_variant(bundle, flags=AMX)
    assert (on_amx.precision, on_amx.decoder_precision) == ("bf16", "fp32")
    assert "default variant (chosen on Intel(R) Xeon(R) Platinum 8480+)" in on_amx.why
    laptop = choose_variant(bundle, flags=AVX2)
    assert (laptop.backend, laptop.precision, laptop.decoder_precision) == \
        ("openvino", "fp32", "fp32")
    assert "amx_bf16, avx512_bf16" in laptop.why and "Xeon" in laptop.why
    vnni = choose_variant(bundle, flags=VNNI)  # no BF16 but VNNI: the INT8 fallback pays
    assert (vnni.precision, vnni.decoder_precision) == ("int8", "fp32")
    assert "next-best" in vnni.why
    explicit = choose_variant(bundle, "openvino", "bf16", flags=AVX2)
    assert explicit.precision == "bf16" and explicit.why == "as asked"


def test_fallback_skips_variants_the_bundle_does_not_hold():
    default = {"backend": "openvino", "precision": "int8", "decoder_precision": "int8",
               "fallbacks": [{"backend": "openvino", "precision": "bf16",
                              "decoder_precision": "bf16"}]}
    choice = choose_variant(_bundle(default, ("fp32", "int8")), flags=AMX - {"amx_int8",
                                                                           "avx512_vnni"})
    assert choice.precision == "fp32" and "FP32 instead" in choice.why


def test_speed_needs_per_precision():
    assert speed_needs("fp32", "fp16") == []
    assert speed_needs("int8", "fp32") == speed_needs("int8") and \
        "avx512_vnni" in speed_needs("int8")[0]
    assert len(speed_needs("int8-bf16")) == 2 and "amx_bf16" in speed_needs("bf16")[0]


def test_predictor_says_which_variant_and_falls_back(bundle_copy, monkeypatch):
    """A bundle whose default is the FP16 IR with a (pretended) ISA need: the Predictor reports
    the default where the flags are present and runs FP32 where they are not, saying why."""
    from samedge.runtime import Predictor
    from samedge.runtime import variants as module

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["default_variant"] = {"backend": "openvino", "precision": "bf16",
                                   "decoder_precision": "fp32", "cpu": {"name": "a Xeon"}}
    write_manifest(bundle_copy, manifest)  # sealed, as a build on that Xeon would write it
    monkeypatch.setattr(module, "cpu_flags", lambda: AVX2)
    predictor = Predictor(bundle_copy)
    assert (predictor.backend, predictor.precision) == ("openvino", "fp32")
    assert "a Xeon" in predictor.choice.why and "FP32 instead" in predictor.choice.why


# -- margins --------------------------------------------------------------------------------------
def test_margin_keeps_half_of_each_allowance():
    int8 = with_margin(DEFAULT_GATES["int8"])
    assert int8.max_mean_dice_drop == pytest.approx(0.005)
    assert int8.min_worst_dice == pytest.approx(0.95)
    fp16 = with_margin(DEFAULT_GATES["fp16"])
    assert (fp16.max_mean_dice_drop, fp16.min_worst_dice) == pytest.approx((0.001, 0.99))
    # the INT8 encoder: a pass by 0.0001 passes the gate, not the margin
    summary = {"prompts": 28, "dice_mean": 0.9901, "dice_min": 0.955}
    assert DEFAULT_GATES["int8"].evaluate(summary).passed
    assert not int8.evaluate(summary).passed
    assert GateSet().for_precision("int8-bf16") == DEFAULT_GATES["int8"]
    with pytest.raises(ValueError):
        with_margin(DEFAULT_GATES["int8"], 0.0)


def test_search_target_is_the_gate_with_its_margin():
    from samedge.quantize.build import at_least
    from samedge.validation.gate import Gate

    margin = with_margin(DEFAULT_GATES["int8"])
    loose = Gate(max_mean_dice_drop=0.01, min_worst_dice=0.90)
    aimed = at_least(loose, margin)
    assert (aimed.max_mean_dice_drop, aimed.min_worst_dice) == pytest.approx((0.005, 0.95))


def test_pipeline_keeps_out_a_variant_without_margin(bundle_copy, real_slices, litemedsam_card):
    """An FP16 IR that passes its gate (drop 0.0015 ≤ 0.002) but uses more than half of it leaves
    the bundle, the reason recorded; FP32 stays the default, timed with its evidence."""
    from samedge.pipeline.precision import quantize_for_pipeline

    measured = {("openvino", "fp32"): fake_drift("fp32", [1.0] * 4),
                ("openvino", "fp16"): fake_drift("fp16", [0.9985, 0.9985, 0.9985, 0.9985])}
    slices = [s for s in real_slices if s.name == "CT_small.dcm"]
    result = quantize_for_pipeline(bundle_copy, litemedsam_card, slices, threads=1,
                                   measured=measured, int8=False,
                                   rule=SelectionRule(rounds=2, max_rounds=2))
    rows = {r.label: r for r in result.rows}
    assert rows["openvino fp16"].passed and not rows["openvino fp16"].margin.passed
    assert not rows["openvino fp16"].in_bundle
    bundle = Bundle(bundle_copy)
    assert not [a for a in bundle.artifacts if a["precision"] == "fp16"
                and a["format"] == "openvino_ir"]
    why = bundle.manifest["builds"][-1]["rejected"][0]["why"][0]
    assert "half its allowance" in why and "would not hold on new data" in why
    default = bundle.manifest["default_variant"]
    assert default["precision"] == "fp32" and default["needs"] == []
    assert len(default["per_round"]["openvino fp32"]["encoder_s"]) == 2 == default["rounds"]
    assert default["cpu"]["name"] and "isa" in default["cpu"]


# -- BF16: refusal where the CPU cannot compute it, and the variant from build to runtime ----------
def test_bf16_build_refuses_a_cpu_without_bf16():
    from samedge.quantize.bf16 import require_bf16

    with pytest.raises(PrecisionUnsupportedError) as info:
        require_bf16(AVX2, ["FP32", "INT8"])
    assert "cannot compute BF16 natively" in str(info.value) and "AMX-BF16" in info.value.hint
    with pytest.raises(PrecisionUnsupportedError):
        require_bf16(AMX, ["FP32"])  # OpenVINO must agree
    assert require_bf16(AMX, ["FP32", "BF16"]) == ["amx_bf16", "avx512_bf16"]


def test_openvino_honours_the_bf16_hint_only_where_the_cpu_computes_it():
    """What compile_model does with INFERENCE_PRECISION_HINT=bf16 on this CPU: where OpenVINO
    lists no BF16 capability it compiles f32 and the outputs equal FP32's bit for bit."""
    import openvino as ov
    from openvino import opset13 as ops

    from samedge.quantize.bf16 import openvino_capabilities

    rng = np.random.default_rng(0)
    x = ops.parameter([4, 64], np.float32, name="x")
    y = ops.matmul(x, ops.constant(rng.standard_normal((64, 64)).astype(np.float32)), False, False)
    model = ov.Model([y], [x])
    feed = rng.standard_normal((4, 64)).astype(np.float32)
    core = ov.Core()
    f32 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    bf16 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    if "BF16" in openvino_capabilities():
        assert str(bf16.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    else:
        assert str(bf16.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        np.testing.assert_array_equal(bf16(feed)[0], f32(feed)[0])


def _toy_model():
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(1)
    h = x = ops.parameter([1, 32], np.float32, name="x")
    for b in range(3):
        h = ops.matmul(h, ops.constant(rng.standard_normal((32, 32)).astype(np.float32)),
                       False, False)
        h.set_friendly_name(f"/layers.0/blocks.{b}/mlp/MatMul")
        h = ops.relu(h)
        h.set_friendly_name(f"/layers.0/blocks.{b}/act/Relu")
    return ov.Model([h], [x])


def test_kept_units_carry_openvinos_precise_mark(tmp_path):
    """Units kept FP32 get the mark on every op of their block, read back from IR as OpenVINO's
    own attribute — the one ``compress_to_fp16`` and the CPU plugin's keepOrigPrecision read."""
    import openvino as ov

    from samedge.quantize.bf16 import OpenVinoPrecise, marked_units

    precise = OpenVinoPrecise(_toy_model(), "block")
    assert list(precise.units) == [f"/layers.0/blocks.{b}" for b in range(3)]
    model = precise.realize(["/layers.0/blocks.0", "/layers.0/blocks.2"])
    assert marked_units(model) == ["/layers.0/blocks.1/mlp/MatMul", "/layers.0/blocks.1/act/Relu"]
    kinds = {k for op in model.get_ordered_ops() for k in op.get_rt_info()}
    assert "DisablePrecisionConversion_0" in kinds
    # the same mark on a weight keeps it FP32 when the IR is compressed to FP16
    weights = OpenVinoPrecise(_toy_model(), "op")
    marked = weights.realize([])  # every op kept
    for op in marked.get_ordered_ops():
        if op.get_type_name() == "Constant":
            op.get_rt_info()["precise_0"] = ""
    ov.save_model(marked, str(tmp_path / "m.xml"), compress_to_fp16=False)
    again = ov.Core().read_model(str(tmp_path / "m.xml"))
    ov.save_model(again, str(tmp_path / "c.xml"), compress_to_fp16=True)
    types = {str(op.get_output_element_type(0)) for op in
             ov.Core().read_model(str(tmp_path / "c.xml")).get_ordered_ops()
             if op.get_type_name() == "Constant"}
    assert types == {"<Type: 'float32'>"}


def test_bf16_variant_is_built_recorded_and_run_with_its_hint(bundle_copy, real_slices,
                                                               monkeypatch):
    """With BF16 pretended (this CPU computes a bf16 hint as f32, so the drift here is FP32's and
    says nothing about BF16: the test checks the plumbing, not the accuracy): the build records
    the hint and the kept units on the artifact, and the runtime compiles it with that hint."""
    from samedge.quantize import bf16 as module
    from samedge.quantize.build import build_variants
    from samedge.quantize.calibset import CalibrationSet
    from samedge.quantize.candidates import SearchOptions
    from samedge.runtime import Predictor

    monkeypatch.setattr(module, "bf16_instructions", lambda flags=None: ["amx_bf16"])
    monkeypatch.setattr(module, "openvino_capabilities", lambda: ["FP32", "BF16"])
    ct = [s for s in real_slices if s.name == "CT_small.dcm"]
    result = build_variants(bundle_copy, "bf16", "openvino", ["encoder"],
                            CalibrationSet(slices=ct, augment=False, count=1), ct,
                            search=SearchOptions(method="none", granularity="block"), threads=1,
                            report=False, layer_errors=False)
    assert [c.label() for c in result.added] == ["encoder openvino_ir bf16"]
    bundle = Bundle(bundle_copy)
    artifact = bundle.find("encoder", "openvino", "bf16")
    assert artifact["inference_precision"] == "bf16"
    assert artifact["validation"]["openvino"]["gate"]["max_mean_dice_drop"] == 0.005
    predictor = Predictor(bundle_copy, backend="openvino", precision="bf16",
                          decoder_precision="fp32", threads=1)
    assert predictor.encoder._config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert predictor.decoder._config["INFERENCE_PRECISION_HINT"] == "f32"
    from samedge.validation.validate import bundle_variants

    assert ("openvino", "bf16", "fp32") in bundle_variants(bundle)


def test_build_refuses_int8_bf16_for_onnx_backends(bundle_copy):
    """INT8 + BF16 is an INT8 IR's float parts under OpenVINO's bf16 hint; ONNX (TensorRT's
    graphs) takes bf16 and int8 on their own."""
    from samedge.errors import SamedgeError
    from samedge.quantize.build import build_variants

    with pytest.raises(SamedgeError, match="OpenVINO only"):
        build_variants(bundle_copy, "int8-bf16", "onnxruntime", ["encoder"])


def test_margin_drops_the_graph_that_drifts_more_from_a_failing_pair(monkeypatch, tmp_path):
    """Encoder and decoder INT8 each pass with margin, the pair does not: only the graph that
    drifts more leaves (the other stays with an FP32 partner); a single row failing the margin
    takes its pair with it without costing the other graph."""
    from samedge.pipeline import precision as module
    from samedge.pipeline.precision import VariantRow, keep_within_margins

    dropped = []
    monkeypatch.setattr(module, "drop_variants", lambda path, keys, why: dropped.append(keys))

    def row(encoder, decoder, mean, worst=0.99):
        return VariantRow("openvino", encoder, decoder,
                          {"prompts": 20, "dice_mean": mean, "dice_min": worst}, None)

    rows = [row("int8", "fp32", 0.997), row("fp32", "int8", 0.996), row("int8", "int8", 0.994)]
    messages = []
    keep_within_margins(tmp_path, rows, GateSet(), messages)
    assert dropped == [[("decoder", "openvino_ir", "int8")]]
    assert [r.in_bundle for r in rows] == [True, False, False]
    assert "with the other graph's int8 the pair fails" in messages[0]

    dropped.clear()
    rows = [row("int8", "fp32", 0.993), row("fp32", "int8", 0.998), row("int8", "int8", 0.992)]
    keep_within_margins(tmp_path, rows, GateSet(), [])
    assert dropped == [[("encoder", "openvino_ir", "int8")]]
    assert [r.in_bundle for r in rows] == [False, True, False]
