"""Shared test settings: deterministic torch, few threads (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
