from pathlib import Path

from smolbox.config import cli_fields

REPO = Path(__file__).resolve().parent.parent


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key, _ in cli_fields() if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/test" in readme and "bash scripts/demo" in readme
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()


def test_readme_layout_names_every_file():
    """The Layout block lists every top-level entry and every file of the folders it itemizes, each of smolbox's
    subpackages on a line of its own."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    groups, current = {}, ""
    for line in block.splitlines():
        if line and not line[0].isspace():
            current = line.split()[0] if line.split()[0].endswith("/") else ""
        groups[current] = groups.get(current, "") + " " + line
    top = {p.name + ("/" if p.is_dir() else "") for p in REPO.iterdir()
           if not p.name.startswith((".venv", ".git", ".pytest_cache")) and p.name not in IGNORED}
    missing = [name for name in sorted(top) if name not in block]
    packages = [f"smolbox/{p.name}/" for p in sorted((REPO / "smolbox").iterdir()) if (p / "__init__.py").is_file()]
    assert packages, "smolbox has subpackages (train/, export/, serve/)"
    for folder in ("smolbox/", *packages, "configs/", "bench/", "experiments/", "scripts/", "entrypoints/", "docs/"):
        if folder not in groups:
            missing.append(f"{folder} (a line of its own)")
        files = [p.name for p in (REPO / folder).iterdir() if p.is_file() and p.name != "__init__.py"]
        missing += [f"{folder}{name}" for name in sorted(files) if name not in groups.get(folder, "")]
    assert not missing, f"README Layout lacks {missing}"


# Not part of the tree: what a checkout makes as it is used (.gitignore), and GPU-session carries (.devcarry).
IGNORED = {"runs", "exports", "build", "smolbox.egg-info", "__pycache__", ".env", ".smolbox-cache", ".whl", ".devcarry"}
