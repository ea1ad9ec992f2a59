"""Discovery of the official-implementation golden fixtures and their tolerances.

Parity tests take the fixture root from `KIMIA_REFERENCE_FIXTURES` (default `../shared/fixtures/reference`
relative to the repository root) and run every folder below it whose `manifest.json` names the component
kind under test, so new fixture folders need no code change. A missing root, a kind with no folder or a
folder that fails to load is a test failure, never a skip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "fixtures" / "reference"


def fixture_root() -> Path:
    return Path(os.environ.get("KIMIA_REFERENCE_FIXTURES", str(DEFAULT_ROOT))).resolve()


@dataclass(frozen=True)
class Fixture:
    """One fixture folder: its path and parsed manifest."""

    path: Path
    manifest: dict[str, Any]

    def tol(self, name: str, default_atol: float = 1e-4, default_rtol: float = 1e-4) -> dict[str, float]:
        """Tolerance entry `name` of the manifest as `dict(atol=, rtol=)`; 'exact' gives zeros."""
        t = self.manifest.get("tolerances", {}).get(name)
        if t is None:
            return {"atol": default_atol, "rtol": default_rtol}
        if t == "exact":
            return {"atol": 0.0, "rtol": 0.0}
        return {"atol": float(t.get("atol", default_atol)), "rtol": float(t.get("rtol", default_rtol))}

    def tensors(self, filename: str = "expected.safetensors") -> dict[str, torch.Tensor]:
        return load_file(str(self.path / filename))

    def input_paths(self) -> list[Path]:
        """The audio files named by the manifest's "inputs" (comma-separated, relative to this folder)."""
        return [(self.path / rel.strip()).resolve() for rel in self.manifest["inputs"].split(",") if rel.strip()]

    def input_wavs(self) -> dict[str, torch.Tensor]:
        """Those files as float32 16 kHz waveforms, keyed by file stem (read as stored, no resampling)."""
        import soundfile as sf

        out = {}
        for p in self.input_paths():
            data, sr = sf.read(str(p), dtype="float32")
            assert sr == 16000, f"{p}: {sr} Hz"
            out[p.stem] = torch.from_numpy(data)
        return out

    def json(self, filename: str) -> Any:
        return json.loads((self.path / filename).read_text())

    def __str__(self) -> str:  # readable test ids
        return str(self.path.relative_to(fixture_root())) if self.path.is_relative_to(fixture_root()) else str(self.path)


def find_fixtures(kind: str) -> list[Fixture]:
    root = fixture_root()
    found = []
    if root.is_dir():
        for dirpath, _dirs, files in os.walk(root):
            if "manifest.json" in files:
                p = Path(dirpath)
                manifest = json.loads((p / "manifest.json").read_text())
                if manifest.get("component") == kind:
                    found.append(Fixture(p, manifest))
    return sorted(found, key=lambda f: str(f.path))


def fixture_params(kind: str) -> list:
    """pytest params for every fixture folder of `kind`; a single failing param if there are none."""
    fixtures = find_fixtures(kind)
    if not fixtures:
        return [pytest.param(None, id=f"no-{kind}-fixtures")]
    return [pytest.param(f, id=str(f)) for f in fixtures]


def require(fixture: Fixture | None, kind: str = "") -> Fixture:
    """Fail (not skip) when no fixture folder of the kind was found."""
    if fixture is None:
        pytest.fail(f"no reference fixture folder of kind {kind!r} under {fixture_root()} (KIMIA_REFERENCE_FIXTURES)")
    return fixture


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict[str, float], what: str = "") -> None:
    actual = actual.detach().to("cpu")
    expected = expected.to(actual.dtype) if expected.is_floating_point() else expected
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.is_floating_point():
        mism = (actual != expected).sum().item()
        assert mism == 0, f"{what}: {mism} of {actual.numel()} ids differ"
        return
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")
