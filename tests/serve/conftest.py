import pytest


@pytest.fixture(scope="session")
def random_export(tmp_path_factory, tiny_bundle):
    """An export of a random-weight model of the tiny bundle's shapes, every variant: these tests need answers that
    run to max_tokens (continuous batching, stop strings), and the pretrained tiny model ends its answers in a few
    tokens."""
    from smolbox import tiny
    from smolbox.config import load_config
    from smolbox.export import export

    root = tmp_path_factory.mktemp("serve")
    base = root / "random-base"
    tiny.build_model().save_pretrained(base)
    tiny.build_processor().save_pretrained(base)
    overrides = {"model.id": str(base), "export.source": "base", "run.name": "srv",
                 "export.output_dir": str(root / "exports"), "export.variants": ["fp32", "fp16", "q8", "q4", "q4f16", "int8"]}
    return export(load_config("tiny", overrides=overrides, env={}, dotenv=None)).folder
