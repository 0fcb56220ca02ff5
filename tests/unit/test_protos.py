"""The committed gRPC stubs are exactly what scripts/gen_protos.sh makes from protos/*.proto."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path("pdserve/protos")


def test_generated_stubs_match_the_protos(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts/gen_protos.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.name for p in (tmp_path / STUBS).iterdir())
    committed = sorted(p.name for p in (ROOT / STUBS).iterdir()
                       if p.name.endswith((".py", ".pyi")) and p.name != "__init__.py")
    assert generated and generated == committed
    for name in generated:
        assert (tmp_path / STUBS / name).read_text() == (ROOT / STUBS / name).read_text(), (
            f"{STUBS / name} is stale: run scripts/gen_protos.sh and commit the result")
