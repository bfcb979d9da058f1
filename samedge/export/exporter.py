"""From a ModelCard to a bundle: export both graphs, validate them against PyTorch on real slices,
convert them for each backend, and commit everything atomically.

Adaptation families (those with ``card.reference``) are validated against their unmerged,
upstream-faithful model: the merged ONNX must equal what the authors' code computes. Depth models
are validated on stacks of D adjacent real slices; semantic families get the prompt-free
class-logit decoder (``export/semantic.py``), Med-SA its own token output
(``export/medsa_decoder.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from samedge.calibration.prompts import auto_boxes
from samedge.calibration.sources import Slice, bundled_stacks
from samedge.export import medsa_decoder
from samedge.export.bundle import BundleWriter
from samedge.export.onnx import (
    PromptDecoder,
    SamInterfaceDecoder,
    Tolerance,
    decoder_spec,
    encoder_spec,
    export_graph,
    sam_interface_spec,
    validate_graph,
)
from samedge.export.openvino import convert_to_ir
from samedge.export.semantic import export_semantic_decoder
from samedge.models.card import ModelCard
from samedge.progress import Steps
from samedge.runtime.transforms import preprocess, preprocess_stack, transform_boxes

OPENVINO_PRECISIONS = ("fp32", "fp16")
UPSTREAM_EMBEDDING_TOLERANCE = Tolerance(atol=5e-4)  # merged ONNX vs unmerged upstream encoder


def decoder_cases(card: ModelCard, embeddings: Sequence[np.ndarray],
                  images: Sequence[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Realistic decoder inputs: real embeddings, boxes from the real slices, point sets of
    several sizes, prompt batches of 1, 5 and 16, with and without a mask prompt."""
    m = card.preprocessing.mask_size
    rng = np.random.default_rng(0)
    for embedding, image in zip(embeddings, images):
        _, frame = preprocess(image, card.preprocessing)
        corners = transform_boxes(auto_boxes(image), frame, card.preprocessing)  # (5, 2, 2)
        centres = corners.mean(axis=1, keepdims=True)
        box_labels = np.broadcast_to(np.float32([2, 3]), (len(corners), 2))
        layouts = [
            (corners[:1], box_labels[:1]),                                       # B=1, box
            (corners, box_labels),                                               # B=5, box
            (np.concatenate([centres, np.zeros_like(centres)], 1),               # B=5, click+pad
             np.tile(np.float32([1, -1]), (len(corners), 1))),
            (np.concatenate([np.repeat(centres, 3, 1) + rng.normal(0, 2, (5, 3, 2)), corners], 1),
             np.tile(np.float32([1, 0, 1, 2, 3]), (len(corners), 1))),          # B=5, N=5
            (np.tile(corners, (4, 1, 1))[:16], np.tile(box_labels, (4, 1))[:16]),  # B=16
        ]
        for index, (coords, labels) in enumerate(layouts):
            count = coords.shape[0]
            with_mask = index == 1
            yield {
                "image_embeddings": embedding,
                "point_coords": np.ascontiguousarray(coords, dtype=np.float32),
                "point_labels": np.ascontiguousarray(labels, dtype=np.float32),
                "mask_input": (rng.normal(0, 4, (count, 1, m, m)) if with_mask
                               else np.zeros((count, 1, m, m))).astype(np.float32),
                "has_mask_input": np.full(count, float(with_mask), np.float32),
            }


def sam_interface_cases(card, embeddings, images):
    """Meta's decoder takes one prompt with N points, coordinates in the resized frame, and the
    original image size; without a box a pad point is appended."""
    layouts = 5  # decoder_cases yields five prompt layouts per image
    for case, image in zip(decoder_cases(card, embeddings, images), _repeat(images, layouts)):
        yield {
            "image_embeddings": case["image_embeddings"],
            "point_coords": case["point_coords"][:1],
            "point_labels": case["point_labels"][:1],
            "mask_input": case["mask_input"][:1],
            "has_mask_input": case["has_mask_input"][:1],
            "orig_im_size": np.float32(image.shape[:2]),
        }


def _repeat(items, times):
    for item in items:
        for _ in range(times):
            yield item


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

        if card.decoder == "semantic":
            graphs["decoder"] = export_semantic_decoder(card, embeddings, stage / "decoder.onnx",
                                                        steps)
        else:
            centre = card.depth // 2  # prompts are decoded on one slice of each batch
            embeddings = [batch[centre : centre + 1] for batch in embeddings]
            graphs["decoder"] = _export_prompt_decoder(card, embeddings, images, stage, steps)
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


def _export_prompt_decoder(card: ModelCard, embeddings: Sequence[np.ndarray],
                           images: Sequence[np.ndarray], stage: Path, steps: Steps) -> dict:
    """The spine's prompt decoder, or Med-SA's cut to its tokens 0:n and validated against
    Med-SA's upstream decoding; returns the manifest's graph entry."""
    path = stage / "decoder.onnx"
    if card.family == "medsa":
        decoder = medsa_decoder.MedSAPromptDecoder(card.model, card.image_size).eval()
        spec, facts = medsa_decoder.medsa_decoder_spec(card), {"token_selection": "graph"}
        reference = medsa_decoder.upstream_decoder(card.reference)
        cases = list(medsa_decoder.click_cases(card, embeddings[:2], images[:2]))
        title = "Med-SA clicks (B = 1…16 prompts, 1–3 clicks)"
    else:
        decoder = reference = PromptDecoder(card.model, card.image_size).eval()
        spec, facts = decoder_spec(card), {}
        cases = list(decoder_cases(card, embeddings[:2], images[:2]))
        title = "B = 1…16 prompts, N = 1…5 points"
    with steps.step("export prompt encoder + mask decoder to ONNX"):
        export_graph(decoder, spec, tuple(torch.tensor(cases[0][n]) for n in spec.inputs), path)
    with steps.step(f"validate decoder ({title})"):
        measured = validate_graph(path, spec, reference, cases)
    return {"variant": "prompt", **facts, **spec.describe(), "measured": measured}
