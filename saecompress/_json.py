"""JSON for ``--json`` output and file metadata: never a bare ``NaN`` or ``Infinity`` (invalid JSON).

A metric that is not a finite number is written as ``null``, and its dict gains an ``undefined``
entry saying why: ``{"ce_recovered": null, "undefined": {"ce_recovered": "ce_zero equals ce_clean: …"}}``.
"""

from __future__ import annotations

import json
import math
from typing import Any

# why a metric can be undefined (a ratio whose denominator is zero); other keys get the generic reason
REASONS = {
    "ce_recovered": "ce_zero equals ce_clean: zero-ablating the site does not change the loss on this text",
    "ce_recovered_mean_ablation": "ce_mean equals ce_clean: mean-ablating the site does not change the loss "
                                  "on this text",
    "kl_recovered": "kl_zero is 0: zero-ablating the site does not change the predictions on this text",
    "agreement": "no teacher latent fires on these rows",
    "latent_agreement": "no teacher latent fires on these rows",
    "mean_correlation": "no teacher latent fires on these rows",
}
_GENERIC = "not a finite number"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (and explained, see the module docstring)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {key: json_safe(v) for key, v in value.items()}
    undefined = {key: REASONS.get(key, _GENERIC) for key, v in value.items()
                 if isinstance(v, float) and not math.isfinite(v)}
    if undefined:
        out["undefined"] = {**(out.get("undefined") or {}), **undefined}
    return out


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``; raises rather than ever writing ``NaN``."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
