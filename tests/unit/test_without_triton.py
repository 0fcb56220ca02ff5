"""torch's CPU wheels bring no Triton: the engine must still import and run on each kernel's
pure-torch reference, and a kernel launch must say that Triton is missing."""

import subprocess
import sys

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

PROMPT, PARAMS = [5, 6, 7, 8, 9] * 7, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

CODE = f"""
import sys
sys.modules["triton"] = None  # `import triton` now raises ModuleNotFoundError
import pkgutil, importlib, pdserve.kernels
for m in pkgutil.iter_modules(pdserve.kernels.__path__):
    if m.name != "compile_count":  # counts Triton's compiled kernels: Triton only
        importlib.import_module("pdserve.kernels." + m.name)
from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kernels.rms_norm import rms_norm
import torch
[out] = Engine(model="dummy:tiny", num_kv_blocks=64).generate([{PROMPT}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
print(out.token_ids)
try:
    rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)
except ModuleNotFoundError as e:
    print("launch:", e)
assert "triton" not in {{k for k, v in sys.modules.items() if v is not None}}
"""


def test_the_cpu_engine_runs_without_triton():
    [want] = Engine(model="dummy:tiny", num_kv_blocks=64).generate([PROMPT], PARAMS)
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    tokens, launch = result.stdout.splitlines()
    assert tokens == str(want.token_ids)
    assert "Triton is not installed" in launch
