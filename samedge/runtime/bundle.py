"""Reading a bundle: the manifest, its artifacts, and hash verification before anything runs.

A bundle is a folder with ``manifest.json`` and the graphs/engines beside it. The runtime trusts
nothing it has not hashed: a file that was edited, truncated or swapped is refused with an error
that names it, so a bedside device never runs an engine other than the one that was validated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from samedge.errors import BundleError
from samedge.runtime.transforms import Preprocessing

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "samedge-bundle"
FORMAT_VERSION = 1

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A validated view of a bundle folder."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(
                f"{self.path} is not a samedge bundle (no {MANIFEST_NAME})",
                hint="point at the folder written by `samedge export` or `samedge pipeline`",
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{manifest_path} is not a samedge manifest")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is not supported (this samedge reads "
                f"{FORMAT_VERSION})",
                hint="re-export the bundle with this samedge version",
            )
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
        return self.manifest.get("artifacts", [])

    def graph(self, name: str) -> dict:
        graphs = self.manifest.get("graphs", {})
        if name not in graphs:
            raise BundleError(f"bundle has no {name!r} graph (has {sorted(graphs)})")
        return graphs[name]

    def verify(self, artifact: dict) -> None:
        """Check every file of an artifact exists and matches its recorded sha256."""
        for rel, expected in artifact["files"].items():
            if rel in self._verified:
                continue
            file = self.path / rel
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
        """The artifact a backend should load for a graph and precision."""
        formats = BACKEND_FORMATS.get(backend, ())
        for fmt in formats:
            for artifact in self.artifacts:
                if (artifact["graph"], artifact["format"], artifact["precision"]) == (
                    graph, fmt, precision,
                ):
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
        return self.path / artifact["entry"]
