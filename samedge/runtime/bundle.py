"""Reading a bundle: the manifest, its artifacts, and verification before anything runs.

A bundle is a folder with ``manifest.json`` and the graphs/engines beside it. The runtime trusts
nothing it has not checked: the manifest must carry the sha256 of its own canonical form (so an
edited preprocessing or file list is refused, not half-used), fit the schema in
:mod:`samedge.runtime.manifest_schema`, and name only files inside the bundle; each file must
match its recorded sha256 before a backend opens it. A bedside device therefore never runs an
engine, or a preprocessing, other than the one that was validated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from samedge.errors import BackendUnavailableError, BundleError
from samedge.runtime.transforms import Preprocessing

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "samedge-bundle"
# 2: the manifest records ``manifest_sha256``, the hash of its own canonical JSON. Version 1
# bundles (no such hash) are refused with a hint; `samedge info BUNDLE --upgrade` seals one.
FORMAT_VERSION = 2
SEAL_KEY = "manifest_sha256"
UPGRADE_HINT = ("re-export it, or, if this copy comes from a source you trust, run "
                "`samedge info BUNDLE --upgrade` once: it checks every file against its sha256 "
                "and records the manifest's hash as it is now")

# Which artifact formats each backend can execute, in order of preference.
BACKEND_FORMATS = {
    "onnxruntime": ("onnx",),
    "openvino": ("openvino_ir", "onnx"),
    "tensorrt": ("tensorrt_engine",),
}
# Each backend's own format (the first it reads): where its reduced precisions live.
NATIVE_FORMAT = {backend: formats[0] for backend, formats in BACKEND_FORMATS.items()}


def backend_for(fmt: str) -> str:
    """The backend that runs an artifact of format ``fmt`` natively (ONNX: ONNX Runtime)."""
    return next(b for b, native in NATIVE_FORMAT.items() if native == fmt)


# An artifact's file that ONNX Runtime runs instead of its entry (samedge.quantize.bf16_onnx):
# it was validated there. OpenVINO folds some of its rounding Casts (measured: a decoder stand-in
# differs from ONNX Runtime's by 1.5e-3 relative), so it does not take such artifacts at all.
STAND_IN = "cpu_stand_in"
STAND_IN_BACKEND = "onnxruntime"


def runs_stand_in(artifact: dict, backend: str) -> bool:
    """Whether ``backend`` runs the artifact's CPU stand-in rather than its entry."""
    return bool(artifact.get(STAND_IN)) and backend == STAND_IN_BACKEND


# Files a backend opens beside an artifact's entry by name alone: they must be hashed too.
COMPANIONS = {"openvino_ir": ".bin", "tensorrt_engine": ".json"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace, its own hash left
    out): independent of indentation and key order, changed by any edit to any value."""
    body = {key: value for key, value in manifest.items() if key != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its ``manifest_sha256`` (re)computed, placed after the format fields."""
    head = {key: manifest[key] for key in ("format", "format_version") if key in manifest}
    body = {key: value for key, value in manifest.items() if key not in (*head, SEAL_KEY)}
    return {**head, SEAL_KEY: manifest_digest(manifest), **body}


def read_manifest(folder: Path, sealed: bool = True) -> dict:
    """Parse and check ``folder/manifest.json``: a samedge manifest of this format version whose
    recorded hash matches its content (``sealed``), shaped as the schema says."""
    from samedge.runtime.manifest_schema import validate_manifest

    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{folder} is not a samedge bundle (no {MANIFEST_NAME})",
            hint="point at the folder written by `samedge export` or `samedge pipeline`",
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a samedge manifest")
    version = manifest.get("format_version")
    if version == 1 and sealed:
        raise BundleError(f"{folder} is a format 1 bundle, written before samedge verified "
                          "its manifest", hint=UPGRADE_HINT)
    if version != FORMAT_VERSION and not (version == 1 and not sealed):
        raise BundleError(
            f"bundle format version {version} is not supported (this samedge reads "
            f"{FORMAT_VERSION})",
            hint="re-export the bundle with this samedge version",
        )
    if sealed:
        recorded = manifest.get(SEAL_KEY)
        actual = manifest_digest(manifest)
        if recorded != actual:
            raise BundleError(
                f"{path} was modified after it was written: its content hashes to "
                f"{actual[:12]}…, the manifest records {str(recorded)[:12]}…",
                hint="re-export the bundle; never edit a bundle's manifest by hand",
            )
    validate_manifest(manifest, str(path))
    return manifest


class Bundle:
    """A verified view of a bundle folder.

    The manifest is always checked (hash, schema, paths); ``verify`` also hashes every artifact
    up front, otherwise each is hashed when :meth:`find` first hands it out.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._root = self.path.resolve()
        self._check_sizes()
        for artifact in self.artifacts:
            self._check_paths(artifact)
        self._verified: set[str] = set()
        if verify:
            for artifact in self.artifacts:
                self.verify(artifact)

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def artifacts(self) -> list[dict]:
        return self.manifest["artifacts"]

    def graph(self, name: str) -> dict:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"bundle has no {name!r} graph (has {sorted(graphs)})")
        return graphs[name]

    def file(self, rel: str) -> Path:
        """The path of a listed file, refused when it would lie outside the bundle folder
        (absolute, climbing out with "..", or a symlink leading elsewhere)."""
        parts = rel.split("/")
        outside = PurePosixPath(rel).is_absolute() or "\\" in rel or rel == MANIFEST_NAME or any(
            part in ("", ".", "..") for part in parts)
        path = self.path.joinpath(*parts)
        if not outside:
            outside = not path.resolve().is_relative_to(self._root)
        if outside:
            raise BundleError(
                f"the manifest lists {rel!r}, which is not a file inside the bundle",
                hint="a bundle names only its own files; re-export it",
            )
        return path

    def _check_sizes(self) -> None:
        """The sizes the preprocessing, the model and the encoder graph state must agree: one
        edited alone would feed the engine a tensor of another shape."""
        pre, model = self.manifest["preprocessing"], self.manifest["model"]
        pairs = [("model.image_size", model["image_size"], pre["image_size"]),
                 ("model.mask_size", model.get("mask_size", pre["mask_size"]), pre["mask_size"])]
        shape = self.manifest["graphs"]["encoder"]["inputs"][0]["shape"]
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
            pairs.append(("graphs.encoder.inputs[0].shape[2:]", shape[2:],
                          [pre["image_size"]] * 2))
        for field, value, want in pairs:
            if value != want:
                raise BundleError(f"manifest is inconsistent: manifest.{field} is {value}, its "
                                  f"preprocessing says {want}", hint="re-export the bundle")

    def _check_paths(self, artifact: dict) -> None:
        files = artifact["files"]
        label = f"{artifact['graph']}/{artifact['format']}/{artifact['precision']}"
        for key in ("entry", STAND_IN):
            if key in artifact and artifact[key] not in files:
                raise BundleError(f"artifact {label}: its {key} {artifact[key]!r} is not among "
                                  "its hashed files", hint="re-export the bundle")
        for rel in files:
            self.file(rel)
        companion = COMPANIONS.get(artifact["format"])
        if companion and str(PurePosixPath(artifact["entry"]).with_suffix(companion)) not in files:
            raise BundleError(f"artifact {label}: the {companion} file read beside "
                              f"{artifact['entry']} is not hashed in the manifest",
                              hint="re-export the bundle")

    def verify(self, artifact: dict) -> None:
        """Check every file of an artifact exists and matches its recorded sha256."""
        for rel, expected in artifact["files"].items():
            if rel in self._verified:
                continue
            file = self.file(rel)
            if not file.is_file():
                raise BundleError(
                    f"bundle is incomplete: {rel} is listed in the manifest but missing",
                    hint="copy the whole bundle folder, or re-export it",
                )
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(
                    f"{rel} does not match the manifest (sha256 {actual[:12]}… != "
                    f"{expected[:12]}…): the file was modified or corrupted after export",
                    hint="re-export the bundle; never edit files inside it",
                )
            self._verified.add(rel)

    def find(self, graph: str, backend: str, precision: str = "fp32") -> dict:
        """The artifact a backend should load for a graph and precision (verified)."""
        if backend not in BACKEND_FORMATS:
            raise BackendUnavailableError(
                f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKEND_FORMATS)}")
        formats = BACKEND_FORMATS[backend]
        for fmt in formats:
            for artifact in self.artifacts:
                if (artifact["graph"], artifact["format"], artifact["precision"]) == (
                    graph, fmt, precision,
                ) and (STAND_IN not in artifact or backend == STAND_IN_BACKEND):
                    self.verify(artifact)
                    return artifact
        have = sorted(
            {f"{a['graph']}/{a['format']}/{a['precision']}" for a in self.artifacts}
        )
        raise BundleError(
            f"bundle has no {precision} {graph} artifact for backend {backend!r} "
            f"(formats {formats}); it has: {', '.join(have)}",
            hint="build it with `samedge build` or pick another backend/precision",
        )

    def entry_path(self, artifact: dict) -> Path:
        return self.file(artifact["entry"])

    def run_path(self, artifact: dict, backend: str) -> Path:
        """The file ``backend`` opens for an artifact: its entry, or, for a graph ONNX Runtime's
        CPU provider cannot compute (BF16 ONNX, TensorRT's), the stand-in that computes the same
        values in FP32."""
        if runs_stand_in(artifact, backend):
            return self.file(artifact[STAND_IN])
        return self.entry_path(artifact)
