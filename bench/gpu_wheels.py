"""Download, on a machine with a network, the wheels that bench/gpu_check.py needs beyond a bare CUDA image.

    python3 bench/gpu_wheels.py                       # -> gpu-wheels/ (ignored by git), for Python 3.12, x86_64
    python3 bench/gpu_wheels.py --python-version 3.11 --python-version 3.12 --platform manylinux2014_aarch64

A prepared GPU image (torch with CUDA, transformers, lightning, peft, accelerate, pandas, pyarrow, numpy, scipy)
has no Hydra, no `datasets` and no TRL, and a firewalled node cannot pip-install them. These wheels are what is
missing: Hydra and OmegaConf (with antlr4 4.9.3, which PyPI has only as an sdist: built into a wheel here),
hydra-colorlog, `datasets` with the dill / multiprocess / xxhash versions it pins (the JSONL loaders read files
with it), TRL (the peer), and setuptools to build this checkout into an install offline. Copy the folder with the
checkout to the GPU machine; `python bench/gpu_check.py` installs from it with `pip install --no-index --target`
whatever the image lacks. About 10 MB; no torch, no CUDA library, no W&B, no vLLM.

The pins are the versions the test suite runs (`.venv`); after the download each wheel's own requirements are
checked against the other pins (a `datasets` that wants another dill stops here, naming both), so the set is
consistent before a GPU minute is spent on it.
"""

from __future__ import annotations

import argparse
import email.parser
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "gpu-wheels"

# requirement -> the module whose presence says it is installed (gpu_check.py installs only the missing ones)
WHEELS = {
    "hydra-core==1.3.8": "hydra",  # pyproject.toml: hydra-core>=1.3,<1.4
    "omegaconf==2.3.1": "omegaconf",
    "antlr4-python3-runtime==4.9.3": "antlr4",  # omegaconf's and hydra-core's pin (4.9.*); an sdist on PyPI
    "hydra-colorlog==1.2.0": "hydra_plugins.hydra_colorlog",
    "colorlog==6.12.0": "colorlog",
    "datasets==5.2.0": "datasets",
    "dill==0.4.1": "dill",  # datasets 5.2.0: dill>=0.3.0,<0.4.2
    "multiprocess==0.70.19": "multiprocess",  # datasets 5.2.0: multiprocess<0.70.20 (a wheel per Python version)
    "xxhash==4.1.0": "xxhash",  # datasets' hashing; compiled, 0.2 MB
    "trl==1.16.0": "trl",
}
SDISTS = {"antlr4-python3-runtime==4.9.3"}  # no wheel on PyPI: `pip wheel` builds one (pure Python)
# the build backend of this checkout (pyproject.toml: setuptools>=68), for `pip install --no-index` of it
BUILD = "setuptools==78.1.1"


def name(req: str) -> str:
    return req.split("==")[0].lower().replace("_", "-")


def check_pins(requires: dict[str, list[str]], pins: dict[str, str]) -> list[str]:
    """Every pinned package's requirement on another pinned package, checked against that pin. `requires` maps a
    package name to its Requires-Dist lines, `pins` a name to its pinned version. Returns the conflicts, each
    naming both packages (empty: consistent)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare Python: pip's own copy
        from pip._vendor.packaging.requirements import Requirement

    bad = []
    for pkg, lines in requires.items():
        for line in lines:
            r = Requirement(line)
            dep = r.name.lower().replace("_", "-")
            if dep not in pins or (r.marker is not None and not r.marker.evaluate({"extra": ""})):
                continue
            if not r.specifier.contains(pins[dep], prereleases=True):
                bad.append(f"{pkg} requires {line!r}, but {dep} is pinned to {pins[dep]} (bench/gpu_wheels.py)")
    return bad


def wheel_requires(path: Path) -> tuple[str, list[str]]:
    """A wheel's distribution name and its Requires-Dist lines (from its METADATA)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg["Name"].lower().replace("_", "-"), msg.get_all("Requires-Dist") or []


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEST)
    ap.add_argument("--python-version", action="append", help="the GPU machine's Python (default 3.12; repeatable)")
    ap.add_argument("--platform", default="manylinux2014_x86_64", help="its platform tag (xxhash is compiled)")
    a = ap.parse_args()
    a.dest.mkdir(parents=True, exist_ok=True)
    wheels = [r for r in WHEELS if r not in SDISTS] + [BUILD]
    for version in a.python_version or ["3.12"]:
        pip("download", "--only-binary=:all:", "--no-deps", "--python-version", version, "--platform", a.platform,
            "--implementation", "cp", "-d", str(a.dest), *wheels)
    with tempfile.TemporaryDirectory() as tmp:  # pure Python: one wheel serves every Python 3 and platform
        for req in SDISTS:
            if not any(a.dest.glob(f"{name(req).replace('-', '_')}-{req.split('==')[1]}-*.whl")):
                pip("wheel", "--no-deps", "--no-binary", name(req), "-w", tmp, req)
        for w in Path(tmp).glob("*.whl"):
            w.replace(a.dest / w.name)
    pins = {name(r): r.split("==")[1] for r in WHEELS}
    requires = dict(wheel_requires(w) for w in sorted(a.dest.glob("*.whl")) if name(w.name.split("-")[0]) in pins)
    missing = sorted(set(pins) - set(requires))
    if missing:
        sys.exit(f"gpu_wheels: no wheel in {a.dest} for {', '.join(missing)}")
    bad = check_pins(requires, pins)
    if bad:
        sys.exit("gpu_wheels: the pins disagree:\n  " + "\n  ".join(bad))
    size = sum(f.stat().st_size for f in a.dest.glob("*.whl"))
    print(f"{a.dest}: {len(list(a.dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MB; pins consistent. Copy it with "
          "the checkout to the GPU machine and run `python bench/gpu_check.py` there.")


if __name__ == "__main__":
    main()
