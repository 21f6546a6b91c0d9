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
