"""Model manifest: locate installed models, list what is missing, install downloadable ones.

Models come from PyPI packages (they work offline) or, for operators with internet, from an
upstream URL checked against the sha256 in the manifest (`agent/data/models.yaml`, also
visible as `models/manifest.yaml`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from agent.errors import AgentError, ModelMissing

_LOGGER = logging.getLogger(__name__)

MODELS_DIR_ENV = "PBX_AGENT_MODELS_DIR"
DEFAULT_MODELS_DIR = "/var/lib/pbx-agent/models"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry."""

    name: str
    kind: str
    backend: str
    default: bool
    sha256: str
    licence: str
    install: str
    check_file: str = ""
    package: str = ""
    module: str = ""
    path: str = ""
    url: str = ""
    archive_root: str = ""
    sample_rate_hz: int | None = None
    note: str = ""


@dataclass(frozen=True)
class ModelStatus:
    """Where a model is, or why it is missing."""

    spec: ModelSpec
    path: Path | None
    problem: str = ""

    @property
    def installed(self) -> bool:
        """True when the model's files are present and look right."""
        return self.path is not None and not self.problem


def load_manifest() -> tuple[ModelSpec, ...]:
    """Read the embedded model manifest."""
    text = resources.files("agent.data").joinpath("models.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return tuple(ModelSpec(**entry) for entry in data["models"])


def get_spec(name: str) -> ModelSpec:
    """The manifest entry called ``name``."""
    for spec in load_manifest():
        if spec.name == name:
            return spec
    names = ", ".join(s.name for s in load_manifest())
    raise AgentError(f"unknown model {name!r}; the manifest has: {names}")


def models_dir() -> Path:
    """Where downloaded models live ($PBX_AGENT_MODELS_DIR or /var/lib/pbx-agent/models)."""
    return Path(os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR)


def _package_root(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate(spec: ModelSpec, base_dir: Path | None = None) -> ModelStatus:
    """Find an installed model without loading it."""
    if spec.module:
        root = _package_root(spec.module)
        if root is None:
            return ModelStatus(spec, None, f"package {spec.package} is not installed")
        path = root / spec.path
    else:
        path = (base_dir or models_dir()) / spec.name
    check = path / spec.check_file if spec.check_file else path
    if not check.exists():
        return ModelStatus(spec, None, f"{check} does not exist")
    return ModelStatus(spec, path)


def require(name: str, override: str = "") -> Path:
    """Path of a model to load: ``override`` if set, else the installed manifest model."""
    if override:
        path = Path(override)
        if not path.exists():
            raise ModelMissing(f"model path {override} does not exist")
        return path
    status = locate(get_spec(name))
    if not status.installed:
        raise ModelMissing(
            f"model {name} is missing ({status.problem}); install it with: {status.spec.install}")
    assert status.path is not None
    return status.path


def verify(status: ModelStatus) -> str:
    """Checksum the model's main file; returns a problem text or ''."""
    if status.path is None:
        return status.problem
    spec = status.spec
    target = status.path / spec.check_file if spec.module and spec.check_file else status.path
    if spec.url:
        return ""  # archives are verified when downloaded; the unpacked tree has no single hash
    digest = sha256_file(target)
    if digest != spec.sha256:
        return f"sha256 of {target} is {digest}, manifest says {spec.sha256}"
    return ""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _safe_members(names: list[str], dest: Path) -> None:
    root = dest.resolve()
    for name in names:
        target = (dest / name).resolve()
        if target != root and root not in target.parents:
            raise AgentError(f"archive member {name!r} would escape {dest}")


def install(
    spec: ModelSpec,
    base_dir: Path | None = None,
    url: str = "",
    sha256: str = "",
    timeout_s: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Download ``spec``'s archive, check its sha256 and unpack it under ``base_dir``/name.

    Nothing is left behind when the download, the checksum or the unpacking fails.
    """
    if not spec.url and not url:
        raise AgentError(f"model {spec.name} comes from PyPI: {spec.install}")
    source = url or spec.url
    expected = (sha256 or spec.sha256).lower()
    base = base_dir or models_dir()
    base.mkdir(parents=True, exist_ok=True)
    dest = base / spec.name
    with tempfile.TemporaryDirectory(dir=base, prefix=f".{spec.name}-") as tmp:
        archive = Path(tmp) / "archive"
        h = hashlib.sha256()
        done = 0
        _LOGGER.info("downloading %s from %s", spec.name, source)
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as resp, \
                    archive.open("wb") as out:
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if progress:
                        progress(done)
        except OSError as exc:
            raise AgentError(f"download of {spec.name} from {source} failed: {exc}") from None
        digest = h.hexdigest()
        if digest != expected:
            raise AgentError(
                f"sha256 mismatch for {spec.name}: got {digest}, expected {expected}; "
                "not installed")
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _safe_members(zf.namelist(), unpacked)
                zf.extractall(unpacked)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _safe_members(tf.getnames(), unpacked)
                tf.extractall(unpacked, filter="data")
        else:
            raise AgentError(f"{source} is neither a zip nor a tar archive")
        root = unpacked / spec.archive_root if spec.archive_root else unpacked
        if spec.check_file and not (root / spec.check_file).exists():
            raise AgentError(f"archive of {spec.name} lacks {spec.archive_root}/{spec.check_file}")
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    _LOGGER.info("installed %s in %s", spec.name, dest)
    return dest


def installed_vosk_english(base_dir: Path | None = None) -> Path | None:
    """Path of the downloaded English vosk model, if an operator installed it."""
    status = locate(get_spec("vosk-small-en-us"), base_dir)
    return status.path if status.installed else None
