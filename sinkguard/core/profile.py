"""Sink profiles: what the online detector and the interventions need to know about one model.

A profile is a folder with ``profile.json`` (metadata, validated on load) and
``profile.safetensors`` (per-layer reference directions and statistics). Never pickle: a profile
may come from someone else. Loading a profile against other weights is refused (see
:mod:`sinkguard.core.fingerprint`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load_file, save_file

from sinkguard._version import __version__
from sinkguard.core.fingerprint import ModelInfo
from sinkguard.core.settings import AttentionConfig, DetectorConfig, describe_validation_error
from sinkguard.errors import ProfileError

PROFILE_SCHEMA = "sinkguard.profile"
PROFILE_SCHEMA_VERSION = 3
META_FILE = "profile.json"
TENSOR_FILE = "profile.safetensors"
logger = logging.getLogger("sinkguard")


class FormingLayer(BaseModel):
    """An MLP layer that forms secondary sinks, with the statistics of what it wrote."""

    model_config = ConfigDict(extra="forbid")
    layer: int = Field(ge=0)
    count: int = Field(ge=0)
    mlp_norm_ratio_median: float
    mlp_norm_ratio_p10: float
    mlp_norm_ratio_p90: float
    mlp_cos_median: float
    alert_mlp_norm_ratio: float
    """Online formation signal: an MLP output this many times the median token's (and aligned)
    at this layer is a sink being formed. Half the 10th percentile seen in calibration, at least 3."""


class ProfileMeta(BaseModel):
    """The JSON half of a profile; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")
    schema_: str = Field(alias="schema")
    schema_version: int
    sinkguard_version: str
    created: str
    model: dict[str, Any]
    detector: DetectorConfig
    attention: AttentionConfig
    reference_position: int = Field(ge=0)
    window_layers: list[int]
    forming_layers: list[FormingLayer]
    sink_levels: list[dict[str, Any]]
    sink_heads: list[tuple[int, int]]
    """(layer, head) pairs where secondary sinks draw more than the attention sink threshold."""
    validation: dict[str, Any]
    """How the detector was chosen and how far it agrees with attention-confirmed sinks on the
    calibration prompts: ``status`` (validated / no_secondary_sinks / below_target / unvalidated),
    the chosen setting's agreement, the criteria, and the best settings tried."""
    calibration: dict[str, Any]


REQUIRED_TENSORS = {
    "reference_hidden": 2,  # [L, d] unit direction of the reference's hidden state per layer
    "reference_mlp": 2,  # [L, d] unit direction of the reference's MLP output per layer
    "reference_norm": 1,  # [L]
    "median_hidden_norm": 1,  # [L]
    "median_mlp_norm": 1,  # [L]
}


class SinkProfile:
    """A calibrated sink profile for one model."""

    def __init__(self, meta: ProfileMeta, tensors: dict[str, np.ndarray]) -> None:
        self.meta = meta
        self.tensors = tensors
        self._validate()

    # -- identity -----------------------------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return ModelInfo(**self.meta.model)

    def check_model(self, info: ModelInfo) -> None:
        """Refuse a model that is not the one this profile was calibrated on (the same weights at
        another precision pass; see :func:`sinkguard.core.fingerprint.compare_identity`)."""
        check = self.model.identity_check(info)
        if not check.accepted:
            raise ProfileError(
                f"this sink profile was calibrated on {self.model.name} and does not match model "
                f"{info.name}: {check.message}. Calibrate a profile for this model with `sinkguard calibrate`."
            )
        logger.info("sinkguard: profile matches the model: %s", check.message)

    # -- what detectors read ------------------------------------------------------------------
    @property
    def reference_position(self) -> int:
        return self.meta.reference_position

    @property
    def median_mlp_norm(self) -> np.ndarray:
        return self.tensors["median_mlp_norm"]

    @property
    def validation_status(self) -> str:
        return str(self.meta.validation.get("status", "unvalidated"))

    @property
    def median_hidden_norm(self) -> np.ndarray:
        return self.tensors["median_hidden_norm"]

    def reference_hidden_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.tensors["reference_hidden"])

    def window_mask(self) -> np.ndarray:
        mask = np.zeros(self.model.num_layers, dtype=bool)
        mask[self.meta.window_layers] = True
        return mask

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()},
                  str(folder / TENSOR_FILE), metadata={"schema": PROFILE_SCHEMA})
        (folder / META_FILE).write_text(self.meta.model_dump_json(by_alias=True, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> SinkProfile:
        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / TENSOR_FILE
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise ProfileError(f"not a sink profile: {path} is missing (a profile is a folder "
                                   f"with {META_FILE} and {TENSOR_FILE})")
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("schema") != PROFILE_SCHEMA:
            raise ProfileError(f"{meta_path} is not a sinkguard profile (schema field is not '{PROFILE_SCHEMA}')")
        if raw.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise ProfileError(
                f"{meta_path} has profile schema version {raw.get('schema_version')}; this sinkguard reads version "
                f"{PROFILE_SCHEMA_VERSION} (version 3 identifies the weights by norms and a projection sample at each "
                "precision, version 2 added the attention-validated detector choice). Recalibrate: "
                "`sinkguard calibrate --model <model> --out <folder>`")
        try:
            meta = ProfileMeta.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise ProfileError(f"{meta_path} is invalid: {describe_validation_error(exc)}") from None
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ProfileError(f"{tensor_path} is corrupt: {exc}") from exc
        return cls(meta, tensors)

    def _validate(self) -> None:
        info = self.model
        expected = {2: (info.num_layers, info.hidden_size), 1: (info.num_layers,)}
        for name, ndim in REQUIRED_TENSORS.items():
            if name not in self.tensors:
                raise ProfileError(f"sink profile lacks tensor '{name}'")
            if tuple(self.tensors[name].shape) != expected[ndim]:
                raise ProfileError(f"sink profile tensor '{name}' has shape {self.tensors[name].shape}, "
                                   f"expected {expected[ndim]} for {info.name}")
        bad = [layer for layer in self.meta.window_layers if not 0 <= layer < info.num_layers]
        if bad:
            raise ProfileError(f"sink profile window_layers {bad} are outside 0..{info.num_layers - 1}")

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "fingerprint": self.model.fingerprint[:16],
            "identity": f"{self.model.weights.coverage}, calibrated on {self.model.weights_dtype} weights",
            "reference_position": self.reference_position,
            "window_layers": self.meta.window_layers,
            "forming_layers": [f.model_dump() for f in self.meta.forming_layers],
            "sink_heads": self.meta.sink_heads,
            "detector": self.meta.detector.model_dump(),
            "validation": {k: v for k, v in self.meta.validation.items() if k != "best_tried"},
            "calibration": self.meta.calibration,
        }


def new_meta(**fields: Any) -> ProfileMeta:
    return ProfileMeta.model_validate({
        "schema": PROFILE_SCHEMA,
        "schema_version": PROFILE_SCHEMA_VERSION,
        "sinkguard_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    })
