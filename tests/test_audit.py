"""scripts/audit_denoisers.py: its verdicts on classes whose status is known from other tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import audit_denoisers  # noqa: E402


def test_known_classes_get_their_status():
    names = audit_denoisers.denoiser_classes()
    assert {"UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"} <= set(names)
    assert all(name.endswith("Model") and ("Transformer" in name or name.startswith("UNet")) for name in names)
    assert audit_denoisers.audit("SD3Transformer2DModel")[0] == "hooked, tested"
    assert audit_denoisers.audit("FluxTransformer2DModel") == (
        "hooked, tested", "test_joint.py, test_joint_maps.py, test_flux_pipeline.py; sites: 57 joint")
    status, detail = audit_denoisers.audit("WanTransformer3DModel")
    assert status == "refused" and "WanAttnProcessor" in detail
    assert audit_denoisers.audit("Transformer2DModel")[0] == "not instantiated"  # no default input kind
    assert audit_denoisers.audit("UNet1DModel")[0] == "crashes"  # a plain TypeError, not a named XattnError
