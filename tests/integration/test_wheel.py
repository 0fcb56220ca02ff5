"""The wheel as a user installs it: built from this checkout, installed into a new virtual
environment whose other packages are the locked ones (Hugging Face's `kernels` and the locked
transformers among them), and used from a directory outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(tmp_path: Path) -> Path:
    """From a clean copy of the sources, so that nothing an earlier build left in the checkout
    (build/, *.egg-info) can get into the wheel."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pdserve", src / "pdserve", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)], check=True)
    [wheel] = (tmp_path / "dist").glob("pdserve-*.whl")
    return wheel


def new_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv holding the wheel; a .pth adds the locked packages of this test's environment
    (a path only: the editable pdserve there is not on it)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", str(wheel)], check=True)
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    locked = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_locked_packages.pth").write_text("\n".join(sorted(locked)) + "\n")
    return venv


def test_the_wheel_holds_only_pdserve_and_works_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in top if not n.endswith((".dist-info", ".data"))} == {"pdserve"}
    venv = new_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}

    def run(*cmd: str) -> str:
        result = subprocess.run(cmd, cwd=outside, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    answer = run(str(venv / "bin" / "pdserve"), "generate", "--model", "smollm2-135m", "--max-tokens", "32",
                 "What is the capital of France?")
    assert "Paris" in answer
    files = run(str(venv / "bin" / "python"), "-c", "import transformers.integrations.hub_kernels, kernels; "
                "import pdserve.kernels.paged_decode_attention as ours; print(ours.__file__); print(kernels.__file__)")
    ours, hugging_face = files.split()
    assert Path(ours).is_relative_to(venv)  # the wheel's, not the checkout's
    assert Path(hugging_face).parent.parent.name == "site-packages"  # Hugging Face's, installed
