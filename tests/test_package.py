"""smolbox as a built wheel (what `pip install .` installs): the shipped configs travel with it, and the CLI runs
from any directory without the source tree."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("smolbox", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root), str(src)],
                   check=True, capture_output=True, text=True)
    (path,) = root.glob("smolbox-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    return target


def run_installed(target: Path, *args, cwd: Path):
    # PYTHONPATH puts the installed copy ahead of the checkout's editable install.
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "smolbox", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # builds the wheel with pip
def test_wheel_carries_every_module_and_shipped_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "smolbox").rglob("*.py")}
    configs = {f"smolbox/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert configs and modules
    assert modules | configs <= names, sorted((modules | configs) - names)


@pytest.mark.slow  # installs the wheel, then smolbox processes from it, verify among them
def test_installed_wheel_runs_config_and_verify_outside_the_checkout(installed, tmp_path, tiny_bundle):
    result = run_installed(installed, "config", "--config", "seed", "--env-file", "", cwd=tmp_path)
    assert result.returncode == 0 and "smolvlm-dpo-seed" in result.stdout, result.stderr
    shipped = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    probe = subprocess.run(
        [sys.executable, "-c", "import smolbox.config as c; print(c.__file__, c.CONFIG_DIR, *c.shipped_configs()); "
                               "[c.load_config(n, env={}, dotenv=None) for n in c.shipped_configs()]"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    module, config_dir, *names = probe.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(config_dir).is_relative_to(installed) and names == shipped
    verify = run_installed(installed, "verify", "--config", "tiny", "--env-file", "", cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr[-3000:]
    assert "bitsandbytes 4-bit" in verify.stdout and "builtin:tiny" in verify.stdout


STAGES = ("smolbox.train", "smolbox.export", "smolbox.serve")
ABOVE_THE_STAGES = ("smolbox.cli", "smolbox.__main__", "smolbox.eval", "smolbox.verify")


def smolbox_imports(path: Path) -> set[str]:
    """The smolbox modules a source file imports, relative imports resolved."""
    import ast

    parts = list(path.relative_to(REPO).with_suffix("").parts)
    package = parts[:-1]  # a module's package; an __init__'s is its own folder
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found |= {".".join([*base, name]) for name in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smolbox"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("smolbox")}
    return found


def test_imports_flow_down_from_the_cli():
    """cli on top, then the stages (train, export, serve; eval and verify may use train's parts), then what they
    share: a shared module imports no stage, and no stage imports another."""
    wrong = []
    for path in sorted((REPO / "smolbox").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        stage = next((s for s in STAGES if module == s or module.startswith(s + ".")), None)
        for imported in smolbox_imports(path):
            target = next((s for s in STAGES if imported == s or imported.startswith(s + ".")), None)
            if imported.startswith(ABOVE_THE_STAGES) and module not in ("smolbox.__main__", "smolbox.cli"):
                wrong.append(f"{module} imports {imported}, which sits above it")
            elif target and stage and target != stage:
                wrong.append(f"{module} imports {imported}: one stage reaches into another")
            elif target and not stage and not module.startswith(ABOVE_THE_STAGES) and module != "smolbox":
                wrong.append(f"{module} (shared) imports the stage {imported}")
            elif target and module in ("smolbox.eval", "smolbox.verify") and target != "smolbox.train":
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong
