"""From a ModelCard to a bundle: export both graphs, validate them against PyTorch on real slices,
convert them for each backend, and commit everything atomically.

Adaptation families (those with ``card.reference``) are validated against their unmerged,
upstream-faithful model: the merged ONNX must equal what the authors' code computes. Depth models
are validated on stacks of D adjacent real slices; semantic families get the prompt-free
class-logit decoder (``export/semantic.py``), SAM-Adapter its binary one (``export/binary.py``),
Med-SA its own token output (``export/medsa_decoder.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from samedge.data.bundled import bundled_stacks
from samedge.data.slices import Slice
from samedge.export import medsa_decoder
from samedge.export.binary import export_binary_decoder
from samedge.export.bundle import BundleWriter
from samedge.export.decoders import export_prompt_decoder, sam_interface_cases
from samedge.export.graphs import (
    SamInterfaceDecoder,
    Tolerance,
    encoder_spec,
    sam_interface_spec,
)
from samedge.export.onnx import export_graph, validate_graph
from samedge.export.openvino import convert_to_ir
from samedge.export.semantic import export_semantic_decoder
from samedge.models.card import ModelCard
from samedge.models.registry import family
from samedge.progress import Steps
from samedge.runtime.transforms import preprocess, preprocess_stack

OPENVINO_PRECISIONS = ("fp32", "fp16")
# Family.decoder_graph → the function that exports and validates that kind of decoder.
DECODER_EXPORTS = {"prompt": export_prompt_decoder, "semantic": export_semantic_decoder,
                   "medsa": medsa_decoder.export_medsa_decoder, "binary": export_binary_decoder}
UPSTREAM_EMBEDDING_TOLERANCE = Tolerance(atol=5e-4)  # merged ONNX vs unmerged upstream encoder


def encoder_inputs(card: ModelCard, images: Sequence[np.ndarray], image_names: Sequence[str],
                   stacks: Sequence[Sequence[Slice]] | None):
    """Encoder validation batches, the slice each batch's prompts are decoded on, and the names
    the manifest records. 2-D models: one batch per image. Depth models: one (D, 3, S, S) batch
    per stack of D adjacent slices (``stacks``, default the bundled MR volume: unrelated slices
    make no stack), prompts on its centre slice."""
    pre = card.preprocessing
    if card.depth == 1:
        return [preprocess(image, pre)[0] for image in images], list(images), list(image_names)
    stacks = stacks if stacks is not None else bundled_stacks(card.depth)
    batches = [preprocess_stack([s.image for s in stack], pre, card.depth)[0] for stack in stacks]
    centres = [stack[card.depth // 2].image for stack in stacks]
    return batches, centres, [[s.name for s in stack] for stack in stacks]


def export_bundle(
    card: ModelCard,
    out: Path,
    images: Sequence[np.ndarray],
    backends: Sequence[str] = ("onnxruntime", "openvino"),
    sam_interface: bool = True,
    steps: Steps | None = None,
    image_names: Sequence[str] = (),
    stacks: Sequence[Sequence[Slice]] | None = None,
) -> dict:
    """Export, validate and convert; returns the committed manifest.

    ``images`` validate 2-D models; depth models (``card.depth`` D > 1) are validated on
    ``stacks`` of D adjacent slices instead (see :func:`encoder_inputs`).
    """
    steps = steps or Steps(quiet=True)
    model = card.model.eval()
    truth = card.reference if card.reference is not None else model
    batches, images, names = encoder_inputs(card, images, image_names, stacks)
    graphs: dict[str, dict] = {}
    with BundleWriter(out) as writer, torch.no_grad():
        stage = writer.staging
        spec = encoder_spec(card)
        if card.reference is not None:
            spec = replace(spec, tolerances={"image_embeddings": UPSTREAM_EMBEDDING_TOLERANCE})
        with steps.step("export encoder to ONNX"):
            export_graph(model.image_encoder, spec, (torch.from_numpy(batches[0]),),
                         stage / "encoder.onnx")
        what = f"stacks of {card.depth} slices" if card.depth > 1 else "slices"
        with steps.step(f"validate encoder on {len(batches)} real {what}"):
            measured = validate_graph(stage / "encoder.onnx", spec,
                                      lambda x: (truth.image_encoder(x),),
                                      ({"image": batch} for batch in batches))
        graphs["encoder"] = {**spec.describe(), "measured": measured}
        writer.add_artifact("encoder", "onnx", "fp32", [stage / "encoder.onnx"])
        embeddings = [model.image_encoder(torch.from_numpy(batch)).numpy() for batch in batches]

        if card.decoder == "prompt":  # prompts are decoded on one slice of each batch
            embeddings = [batch[card.depth // 2 : card.depth // 2 + 1] for batch in embeddings]
        export_decoder = DECODER_EXPORTS[family(card.family).decoder_graph]
        graphs["decoder"] = export_decoder(card, embeddings, images, stage, steps)
        writer.add_artifact("decoder", "onnx", "fp32", [stage / "decoder.onnx"])

        if sam_interface and card.decoder == "prompt":  # Meta's interface is a prompt interface
            sam = SamInterfaceDecoder(model).eval()
            spec = sam_interface_spec(card)
            with steps.step("export Meta-compatible decoder (orig_im_size interface)"):
                example = next(sam_interface_cases(card, embeddings, images))
                export_graph(sam, spec, tuple(torch.tensor(example[n]) for n in spec.inputs),
                             stage / "decoder_sam.onnx")
                measured = validate_graph(stage / "decoder_sam.onnx", spec, sam,
                                          sam_interface_cases(card, embeddings, images))
            # sam_interface_cases covers every validation image: the crop depends on its size.
            graphs["decoder_sam"] = {**spec.describe(), "measured": measured}
            writer.add_artifact("decoder_sam", "onnx", "fp32", [stage / "decoder_sam.onnx"])

        if "openvino" in backends:
            (stage / "openvino").mkdir()
            for graph in ("encoder", "decoder"):
                for precision in OPENVINO_PRECISIONS:
                    with steps.step(f"OpenVINO IR {graph} {precision}"):
                        xml = stage / "openvino" / f"{graph}_{precision}.xml"
                        files = convert_to_ir(stage / f"{graph}.onnx", xml,
                                              compress_to_fp16=precision == "fp16")
                    writer.add_artifact(graph, "openvino_ir", precision, files)
        return writer.commit({
            "model": card.describe(),
            "preprocessing": card.preprocessing.to_dict(),
            "graphs": graphs,
            "validation_inputs": names,
        })
