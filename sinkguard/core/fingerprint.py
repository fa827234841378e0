"""Model identity: shapes plus hashes of the norm weights and of a fixed sample of projection weights.

A profile is only valid for the weights it was calibrated on. The identity hashes two parts:

* ``norms``: every RMSNorm / LayerNorm weight. Different in any full fine-tune, small, and stored
  whole and under the same names by transformers and by vLLM, on every tensor-parallel rank.
* ``projections``: per decoder layer, the first :data:`SAMPLE_SIZE` rows of the attention query
  projection, the first rows of the MLP gate projection and the first columns of the MLP down
  projection. LoRA adapters rarely touch norms, so a merged adapter is caught here (when it
  touches q, gate or down). Both engines hold these slices identically: vLLM fuses q/k/v into
  ``qkv_proj`` with the q rows first and gate/up into ``gate_up_proj`` with the gate rows first,
  and its row-parallel ``down_proj`` gives rank 0 the first input columns, so under tensor
  parallelism rank 0 holds the same slices (other ranks hash norms only). Quantized or otherwise
  non-float projections, and weights the engine repacked and freed (vLLM's CPU backend), leave
  the identity at norms only.

Precision. Each part is hashed three times, from the weights *values* after rounding to float32,
bfloat16 and float16 (round to nearest even, what ``tensor.to(dtype)`` and vLLM's weight loading
do). A float32 checkpoint served in bfloat16 holds exactly ``bf16(w)``, so comparing at the
served (coarser) precision recognises the same weights at another precision, while the float32
hashes compare the values exactly (a bfloat16 checkpoint loaded in float32 has the same values as
the file). Rounding twice is not rounding once (``fp16(bf16(w)) != fp16(w)``): a profile
calibrated on bfloat16 weights cannot tell the float16 copy of the original weights from other
weights, and says so (see :func:`compare_identity`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

PRECISIONS = ("float32", "bfloat16", "float16")
COARSE_PRECISIONS = ("bfloat16", "float16")
PRECISIONS_BY_BITS = ("bfloat16", "float16", "float32")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NORMS, PROJECTIONS = "norms", "projections"
SAMPLE_SIZE = 16
"""Rows (q, gate) or columns (down) sampled per projection and layer."""

# sample name, transformers parameter suffix, vLLM parameter suffix, sliced axis (0 rows, 1 columns)
PROJECTION_SAMPLE: tuple[tuple[str, str, str, int], ...] = (
    ("q_rows", "self_attn.q_proj.weight", "self_attn.qkv_proj.weight", 0),
    ("gate_rows", "mlp.gate_proj.weight", "mlp.gate_up_proj.weight", 0),
    ("down_cols", "mlp.down_proj.weight", "mlp.down_proj.weight", 1),
)
_SLOTS = {suffix: (name, axis) for name, hf, vllm, axis in PROJECTION_SAMPLE for suffix in (hf, vllm)}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class WeightsIdentity:
    """What identifies a model's weights, as computed by either engine or from checkpoint files."""

    fingerprint: str
    """sha256 over every part at float32: the exact identity (and the short name of a profile)."""
    fingerprints: dict[str, dict[str, str]]
    """part (``norms``, ``projections`` when sampled) -> precision -> sha256 of the rounded values."""
    weights_dtype: str
    """The dtype the weights were held in when hashed (``float32`` for a float32 load of any checkpoint)."""

    @property
    def coverage(self) -> str:
        return "norms + projection sample" if PROJECTIONS in self.fingerprints else "norms only"

    def digest(self, parts: Iterable[str], precision: str) -> str:
        parts = sorted(parts)
        if precision == "float32" and parts == sorted(self.fingerprints):
            return self.fingerprint
        return _combine({p: self.fingerprints[p] for p in parts}, precision)

    def precision(self, parts: Iterable[str]) -> str:
        """The coarsest precision that holds these parts' values exactly (bfloat16 is coarser than
        float16: 8 against 11 significand bits; bfloat16 values are mostly float16-exact too)."""
        parts = list(parts)
        full = self.digest(parts, "float32")
        return next((p for p in COARSE_PRECISIONS if self.digest(parts, p) == full), "float32")

    def describe(self, parts: Iterable[str]) -> str:
        precision = self.precision(parts)
        return precision if precision == self.weights_dtype else f"{self.weights_dtype} holding {precision} values"


@dataclass(frozen=True)
class IdentityCheck:
    """How served weights relate to the calibrated ones."""

    accepted: bool
    relation: str
    """``same weights``, ``same weights at another precision``, ``other weights`` or ``cannot tell``."""
    message: str


def compare_identity(calibrated: WeightsIdentity, served: WeightsIdentity) -> IdentityCheck:
    """Whether ``served`` weights are the ``calibrated`` ones, possibly at another precision.

    Exact values first (float32 hashes). Otherwise, where the two sides hold different
    precisions, at the coarser one: served in bfloat16 against calibrated float32 compares the
    bfloat16 hashes (``bf16(w)`` is what the served engine computed); served float32 against a
    bfloat16 calibration compares whether the served weights round to the calibrated ones. Where
    both sides are coarse at different precisions (bfloat16 vs float16) no comparison is exact:
    a failed one cannot tell other weights from the same ones, and says so.
    """
    parts = sorted(set(calibrated.fingerprints) & set(served.fingerprints))
    compared = ""
    if set(parts) != set(calibrated.fingerprints) or set(parts) != set(served.fingerprints):
        side = "served model" if PROJECTIONS in calibrated.fingerprints else "profile"
        compared = (f"; compared on norm weights only: the {side} holds no projection sample (quantized or "
                    "non-float weights, weights repacked by the engine as on vLLM's CPU backend, or a "
                    "tensor-parallel rank other than 0), so a merged LoRA adapter would go unnoticed")
    ours, theirs = calibrated.describe(parts), served.describe(parts)
    if calibrated.digest(parts, "float32") == served.digest(parts, "float32"):
        return IdentityCheck(True, "same weights", f"same weights ({ours} vs {theirs}){compared}")
    held = calibrated.precision(parts), served.precision(parts)
    short = f"fingerprint {calibrated.fingerprint[:16]} vs {served.fingerprint[:16]}"
    if held[0] != held[1]:
        coarser = min(held, key=PRECISIONS_BY_BITS.index)  # one side is that side rounded, if the same weights
        if calibrated.digest(parts, coarser) == served.digest(parts, coarser):
            return IdentityCheck(True, "same weights at another precision",
                                 f"same weights at another precision: calibrated on {ours} weights, served with "
                                 f"{theirs} weights, equal when rounded to {coarser}{compared}")
        if "float32" not in held:
            finer = max(held, key=PRECISIONS_BY_BITS.index)
            return IdentityCheck(
                False, "cannot tell",
                f"the weights differ or only their precision does; sinkguard cannot tell ({short}): the profile was "
                f"calibrated on {ours} weights and the model is served with {theirs} weights. The {coarser} and "
                f"{finer} copies of the same float32 weights are each rounded once from the original, and rounding "
                f"one to the other's precision is not that copy (double rounding), so they cannot be compared exactly. "
                f"Calibrate on the float32 checkpoint, which compares exactly at any served precision, or serve "
                f"the {held[0]} weights the profile was calibrated on{compared}")
    where = "" if held[0] == held[1] else (
        f"; compared rounded to {min(held, key=PRECISIONS_BY_BITS.index)} ({ours} vs {theirs}), where a copy rounded "
        "by another route than once to nearest (e.g. float32 -> float16 -> bfloat16) also reads as other weights")
    return IdentityCheck(False, "other weights",
                         f"the weights differ ({short}): same architecture, other weights{where}{compared}")


def _combine(parts: dict[str, dict[str, str]], precision: str) -> str:
    digest = hashlib.sha256()
    for part in sorted(parts):
        digest.update(f"{part}:{parts[part][precision]}\n".encode())
    return digest.hexdigest()


def _canonical(name: str) -> str:
    # "model.layers.3.input_layernorm.weight" and "model.language_model.layers.3..." match.
    index = name.find("layers.")
    return name[index:] if index >= 0 else name.rsplit(".", 2)[-2] + ".weight"


def _layer_of(name: str) -> tuple[int, str] | None:
    match = _LAYER.search(name.replace(".base_layer.", "."))  # vLLM with LoRA enabled wraps the linear layers
    return (int(match.group(1)), match.group(2)) if match else None


def sample_slot(name: str) -> tuple[str, int] | None:
    """(canonical sample name, sliced axis) when ``name`` is a sampled projection weight in
    transformers' or vLLM's naming (``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.q_rows``)."""
    found = _layer_of(name)
    if found is None or found[1] not in _SLOTS:
        return None
    sample, axis = _SLOTS[found[1]]
    return f"layers.{found[0]}.{sample}", axis


def take_sample(weight: Any, axis: int) -> Any:
    """The sampled slice of a projection weight (a tensor or a safetensors slice)."""
    return weight[:SAMPLE_SIZE] if axis == 0 else weight[:, :SAMPLE_SIZE]


def _part_hashes(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    tensors = sorted(((name, weight.detach().cpu()) for name, weight in named), key=lambda x: x[0])
    hashes = {}
    for precision, dtype in _TORCH_DTYPES.items():
        digest = hashlib.sha256()
        for name, weight in tensors:
            digest.update(f"{name}{tuple(weight.shape)}".encode())
            digest.update(weight.to(dtype).float().contiguous().numpy().tobytes())
        hashes[precision] = digest.hexdigest()
    return hashes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_identity(norm_weights: Iterable[tuple[str, torch.Tensor]],
                     sample: Iterable[tuple[str, torch.Tensor]] | None = None) -> WeightsIdentity:
    """The identity of norm weights (any names) and a projection sample (canonical names, see
    :func:`sample_slot`). The sample counts only when it is complete: every layer that has norms
    has all three slices, full-sized and floating point; otherwise the identity is norms only."""
    norms = [(_canonical(name), weight) for name, weight in norm_weights]
    if not norms:
        raise ValueError("no norm weights to fingerprint")
    parts = {NORMS: _part_hashes(norms)}
    dtype = norms[0][1].dtype
    if sample is not None:
        sampled = dict(sample)
        layers = {found[0] for name, _ in norms if (found := _layer_of(name)) is not None}
        expected = {f"layers.{layer}.{name}" for layer in layers for name, *_ in PROJECTION_SAMPLE}
        complete = layers and set(sampled) == expected and all(
            w.dtype in _SAMPLED_DTYPES and w.ndim == 2 and min(w.shape) == SAMPLE_SIZE for w in sampled.values())
        if complete:
            parts[PROJECTIONS] = _part_hashes(sampled.items())
            dtype = next(iter(sampled.values())).dtype
    return WeightsIdentity(fingerprint=_combine(parts, "float32"), fingerprints=parts,
                           weights_dtype=_dtype_name(dtype))


def module_identity(named_parameters: Iterable[tuple[str, torch.Tensor]],
                    sample_projections: bool = True) -> WeightsIdentity:
    """The identity of a loaded model's parameters, in transformers' or vLLM's naming.

    ``sample_projections=False`` (vLLM tensor-parallel ranks other than 0, which hold other
    slices of the projections) hashes the norms only."""
    norms, sample = [], []
    for name, weight in named_parameters:
        if name.endswith("norm.weight"):
            norms.append((name, weight))
        elif sample_projections and (slot := sample_slot(name)) is not None:
            canonical, axis = slot
            if weight.ndim == 2:  # vLLM's CPU backend leaves an empty 1-D placeholder: no sample
                sample.append((canonical, take_sample(weight.detach(), axis)))
    return weights_identity(norms, sample if sample_projections else None)


@dataclass(frozen=True)
class ModelInfo:
    """Architecture and shapes of a model, plus its weights identity (see :class:`WeightsIdentity`)."""

    name: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str
    fingerprints: dict[str, dict[str, str]] = field(hash=False)
    weights_dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def weights(self) -> WeightsIdentity:
        return WeightsIdentity(self.fingerprint, self.fingerprints, self.weights_dtype)

    def identity_check(self, other: ModelInfo) -> IdentityCheck:
        """How ``other`` (the served model) relates to this one (the calibrated model)."""
        for name in ("architecture", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            if getattr(self, name) != getattr(other, name):
                return IdentityCheck(False, "other model",
                                     f"{name} differs: {getattr(self, name)} vs {getattr(other, name)}")
        return compare_identity(self.weights, other.weights)

    def mismatch(self, other: ModelInfo) -> str | None:
        """Why ``other`` is not the same model, or None when it is (possibly at another precision)."""
        check = self.identity_check(other)
        return None if check.accepted else check.message


def model_info_from_config(
    config: Any, architecture: str, name: str, identity: WeightsIdentity, num_layers: int
) -> ModelInfo:
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    return ModelInfo(
        name=name,
        architecture=architecture,
        model_type=str(getattr(text, "model_type", "")),
        num_layers=num_layers,
        hidden_size=int(text.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab_size=int(text.vocab_size),
        fingerprint=identity.fingerprint,
        fingerprints=identity.fingerprints,
        weights_dtype=identity.weights_dtype,
    )
