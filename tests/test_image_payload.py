"""The container image's payload, built the way deploy/Containerfile builds it.

No container engine runs on this machine or in CI, so the image itself is
not built here. What the image holds is its build stage's output: the
directories the Containerfile COPYs, installed (not editable) with
``pip install --prefix``. This test does exactly that into a temporary
prefix and runs the image's three commands from it, with the repository
off the path: a package the COPY lines or the packaging miss, or a module
that only imports from the source tree, fails here, not at an institution.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"


def _build_stage_copies() -> list[str]:
    """The sources the build stage copies into /src (its COPY lines before the second FROM)."""
    text = CONTAINERFILE.read_text()
    build = text.split("\nFROM ", 2)[1]  # the first stage, after its FROM line
    copies = re.findall(r"(?m)^COPY (?!--from)(.+)$", build)
    sources: list[str] = []
    for line in copies:
        sources.extend(line.split()[:-1])
    return sources


def test_the_image_payload_installs_and_its_commands_run_without_the_source_tree(tmp_path):
    src, prefix, elsewhere = tmp_path / "src", tmp_path / "install", tmp_path / "run"
    src.mkdir()
    elsewhere.mkdir()
    sources = _build_stage_copies()
    assert {"pyproject.toml", "vault", "shareholders", "matcher", "vaultrpc", "splitvault"} <= set(sources), sources
    for name in sources:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    # The Containerfile's RUN pip install, less the downloads: dependencies come from this venv.
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            f"--prefix={prefix}", str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    purelib = pathlib.Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert (purelib / "shareholders" / "maintenance").is_dir() and (purelib / "shareholders" / "storage").is_dir()
    # The installed copy first on the path, the repository nowhere on it (the venv's
    # editable install points at the source tree: the prefix must shadow it).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITVAULT_")}
    env["PYTHONPATH"] = str(purelib)
    every_module = (
        "import importlib, pkgutil, sys\n"
        "names = []\n"
        "for top in ('vault', 'vaultrpc', 'shareholders', 'matcher', 'vaultctl', 'splitvault'):\n"
        "    pkg = importlib.import_module(top)\n"
        f"    assert pkg.__file__.startswith({str(purelib)!r}), pkg.__file__\n"
        "    names.append(top)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        if not m.name.endswith('.__main__'):  # a command, run below\n"
        "            importlib.import_module(m.name)\n"
        "        names.append(m.name)\n"
        "print(len(names))\n"
    )
    imported = subprocess.run([sys.executable, "-c", every_module], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert int(imported.stdout) > 60  # every module of the six packages, from the prefix
    # The image's commands: the entrypoint's two servers and --migrate, and the health probe.
    for module in ("shareholders", "matcher", "vaultrpc.probe"):
        ran = subprocess.run([sys.executable, "-m", module, "--help"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=60)
        assert ran.returncode == 0 and "--config" in ran.stdout, (module, ran.stderr[-2000:])
    assert "--migrate" in subprocess.run([sys.executable, "-m", "shareholders", "--help"], cwd=elsewhere, env=env,
                                         capture_output=True, text=True, timeout=60).stdout
