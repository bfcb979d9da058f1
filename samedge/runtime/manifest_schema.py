"""The manifest's JSON Schema: what the runtime reads from ``manifest.json``, typed and bounded.

A manifest that is not shaped like this would otherwise fail deep inside the runtime (a raw
KeyError, a backend's shape error) or, worse, be half-understood: ``"normalize": "bogus"`` used
to fall through to /255. Every field the runtime acts on is pinned here (enums, ranges, paths);
provenance blocks (drift results, tool versions, build history) are only typed, so writers may
add to them without a format change.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from samedge.errors import BundleError
from samedge.runtime.transforms import Preprocessing

SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
# Bundle-relative paths; Bundle.__init__ refuses any that is absolute, climbs out with "..", or
# resolves (through symlinks) outside the bundle folder.
RELATIVE_PATH = {"type": "string", "minLength": 1, "maxLength": 1024}
GRAPHS = ("encoder", "decoder", "decoder_sam")
FORMATS = ("onnx", "openvino_ir", "tensorrt_engine")
PRECISIONS = ("fp32", "fp16", "int8", "bf16", "int8-bf16")
BACKEND_NAMES = ("onnxruntime", "openvino", "tensorrt")
POSITIVE_INT = {"type": "integer", "minimum": 1}
TRIPLE = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}

# Bounds and shapes the Preprocessing dataclass's types cannot state; every other field's schema
# comes from its annotation (a Literal becomes an enum), so a new field is checked at once.
PREPROCESSING_BOUNDS = {
    "image_size": {"type": "integer", "minimum": 16, "maximum": 8192},
    "mask_size": {"type": "integer", "minimum": 4, "maximum": 8192},
    "resize_via": {"type": ["integer", "null"], "minimum": 16, "maximum": 8192},
    "pixel_std": {**TRIPLE, "items": {"type": "number", "exclusiveMinimum": 0}},
    "ct_window": {"oneOf": [
        {"type": "null"},
        {"type": "array", "minItems": 2, "maxItems": 2,
         "prefixItems": [{"type": "number"}, {"type": "number", "exclusiveMinimum": 0}]},
    ]},
}
# Fields every format-1 manifest already carried; later ones default when absent.
PREPROCESSING_REQUIRED = ["image_size", "resize", "interpolation", "normalize", "pixel_mean",
                          "pixel_std", "round_resized", "box_rounding", "point_order",
                          "mask_size", "ct_window"]


def _field_schema(annotation: Any) -> dict:
    if typing.get_origin(annotation) is typing.Literal:
        return {"enum": list(typing.get_args(annotation))}
    simple = {int: "integer", float: "number", bool: "boolean", str: "string"}
    if annotation in simple:
        return {"type": simple[annotation]}
    if typing.get_origin(annotation) is tuple:
        return {"type": "array", "items": {"type": "number"},
                "minItems": len(typing.get_args(annotation)),
                "maxItems": len(typing.get_args(annotation))}
    raise TypeError(f"no schema for a Preprocessing field of type {annotation}")


def preprocessing_schema() -> dict:
    """The ``preprocessing`` section's schema, from :class:`Preprocessing` itself."""
    hints = typing.get_type_hints(Preprocessing)
    properties = {name: PREPROCESSING_BOUNDS.get(name) or _field_schema(hints[name])
                  for name in (f.name for f in dataclasses.fields(Preprocessing))}
    return {"type": "object", "additionalProperties": False,
            "required": PREPROCESSING_REQUIRED, "properties": properties}


PREPROCESSING = preprocessing_schema()

MODEL = {
    "type": "object",
    "required": ["family", "image_size", "embedding_shape", "decoder", "depth"],
    "properties": {
        "family": {"type": "string", "minLength": 1},
        "variant": {"type": "string"},
        "image_size": {"type": "integer", "minimum": 16, "maximum": 8192},
        "embedding_shape": {"type": "array", "items": POSITIVE_INT, "minItems": 3, "maxItems": 3},
        "num_mask_tokens": POSITIVE_INT,
        "mask_size": POSITIVE_INT,
        "prompt": {"enum": ["boxes", "points", "none"]},
        "multimask_default": {"type": "boolean"},
        "decoder": {"enum": ["prompt", "semantic"]},
        "depth": {"type": "integer", "minimum": 1, "maximum": 64},
        "checkpoint": {"type": ["object", "null"]},
        "notes": {"type": "array"},
    },
}

ARTIFACT = {
    "type": "object",
    "required": ["graph", "format", "precision", "entry", "files"],
    "properties": {
        "graph": {"enum": list(GRAPHS)},
        "format": {"enum": list(FORMATS)},
        "precision": {"enum": list(PRECISIONS)},
        "entry": RELATIVE_PATH,
        "files": {"type": "object", "minProperties": 1, "maxProperties": 64,
                  "propertyNames": RELATIVE_PATH, "additionalProperties": SHA256},
        "bytes": {"type": "integer", "minimum": 0},
        # OpenVINO's INFERENCE_PRECISION_HINT a BF16 variant was validated with: the runtime
        # compiles it exactly so, so it is pinned like every other field the runtime acts on
        "inference_precision": {"enum": ["f32", "bf16", "f16"]},
    },
}

TENSOR = {
    "type": "object",
    "required": ["name", "shape"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": {"type": ["integer", "string"]}},
        "dtype": {"type": "string"},
    },
}

GRAPH = {
    "type": "object",
    "required": ["inputs", "outputs"],
    "properties": {
        "inputs": {"type": "array", "items": TENSOR, "minItems": 1},
        "outputs": {"type": "array", "items": TENSOR, "minItems": 1},
        "token_selection": {"enum": ["graph"]},
        "measured": {"type": "object"},
    },
}

MANIFEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "model", "preprocessing", "graphs", "artifacts"],
    "properties": {
        "format": {"const": "samedge-bundle"},
        "format_version": {"type": "integer"},
        "manifest_sha256": SHA256,
        "created": {"type": "string"},
        "command": {"type": "string"},
        "model": MODEL,
        "preprocessing": PREPROCESSING,
        "graphs": {"type": "object", "required": ["encoder", "decoder"],
                   "propertyNames": {"enum": list(GRAPHS)}, "additionalProperties": GRAPH},
        "artifacts": {"type": "array", "items": ARTIFACT, "minItems": 1},
        "default_variant": {"type": ["object", "null"], "properties": {
            "backend": {"enum": list(BACKEND_NAMES)},
            "precision": {"enum": list(PRECISIONS)},
            "decoder_precision": {"enum": [*PRECISIONS, None]},
        }},
        "validation_inputs": {"type": "array"},
        "calibration": {"type": ["object", "null"]},
        "builds": {"type": "array", "items": {"type": "object"}},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _where(error) -> str:
    """``artifacts[3].files`` style location of a schema error."""
    text = "manifest"
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def validate_manifest(manifest: Any, source: str = "manifest.json") -> None:
    """Raise BundleError naming the first field that does not fit :data:`MANIFEST`.

    ``jsonschema`` is imported here, not at module import, so ``samedge`` starts without it.
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(MANIFEST)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: (len(e.absolute_path),
                                                                    list(map(str, e.path))))
    if errors:
        error = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise BundleError(
            f"{source} is malformed: {_where(error)}: {error.message}{more}",
            hint="re-export the bundle; never edit its manifest by hand",
        )
