"""Every benchmark's --quick mode runs and prints its table (speed is never asserted here)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
QUICK = ["mask_generation.py", "encode_decode.py", "convert.py", "train_step.py", "onnx_encode.py", "ce_prefix.py",
         "scale.py", "gpu_check.py", "native_encode.py"]


@pytest.mark.parametrize("script", QUICK)
def test_benchmark_quick_mode_prints_a_table(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                            capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert result.returncode == 0, result.stderr
    assert "|--" in result.stdout
