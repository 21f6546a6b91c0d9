"""The eval stage on one tiny run with the demo's settings and its export: the quality targets of the tiny bundle
(DPO fixes the pretrained model's flaw on held-out pairs; every export variant keeps the answers), the files and
pictures it leaves, and its refusals."""

import json
import shutil

import pytest

from smolbox.eval import EvalError, EvalResult, evaluate, token_agreement, word_f1
from smolbox.onnx_layout import GRAPHS, graph_path

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tiny_run, tiny_export, tiny_config):
    """The session's tiny run (the demo's settings) and its export with every variant."""
    assert tiny_export.manifest["parity_flagged"] == []  # tiny.yaml's parity bounds hold for the demo's run
    return tiny_run.run_dir.parent.parent, tiny_run


@pytest.fixture(scope="module")
def results(root):
    """The demo's eval of the session's run and export, read back from the eval.json files it wrote: the demo runs
    evaluate() on them with these settings (tests/conftest.py), so it is not run a second time here."""
    root, run = root
    paths = {"run": run.run_dir / "eval.json", "export": root / "exports" / "tiny" / "eval.json"}
    return {kind: EvalResult(kind, path, json.loads(path.read_text()), path.with_suffix(".png")) for kind, path in paths.items()}


def test_training_fixes_the_flaw_on_held_out_pairs(results):
    report = results["run"].report
    base, adapter = report["base"], report["adapter"]
    assert report["samples"] == 48 and report["split"] == "builtin:tiny:test"
    # Before: the base model prefers the chosen answer only where it was right already (the other colors).
    assert base["win_rate"] <= 0.6 and base["greedy"]["rejected"] >= 0.4
    assert adapter["reward_accuracy"] >= 0.9
    assert adapter["reward_accuracy"] >= base["win_rate"] + 0.2
    assert adapter["reward_margin_mean"] > 0 and adapter["win_rate"] >= 0.9
    assert adapter["greedy"]["exact"] >= base["greedy"]["exact"] + 0.2
    assert any(e["base"] != e["adapter"] for e in report["examples"])


def test_every_export_variant_keeps_the_answers(results):
    variants = results["export"].report["variants"]
    assert set(variants) == {"fp32", "fp16", "q8", "q4", "q4f16", "int8"}
    fp32 = variants["fp32"]["greedy"]["exact"]
    assert fp32 >= 0.9 and variants["fp32"]["token_agreement"] == 1.0
    assert abs(variants["fp16"]["greedy"]["exact"] - fp32) <= 0.01
    for variant in ("q8", "q4", "q4f16", "int8"):
        assert abs(variants[variant]["greedy"]["exact"] - fp32) <= 0.03, (variant, variants[variant])
        assert 0 < variants[variant]["token_agreement"] <= 1
    assert variants["q4"]["weight_mb"] < variants["fp32"]["weight_mb"]


def test_the_exported_answers_equal_the_trained_adapters(results):
    """fp32 ONNX (the merged adapter, through the serving runtime) answers as the PyTorch adapter does."""
    run_examples = {e["question"] + e["chosen"]: e["adapter"] for e in results["run"].report["examples"]}
    export_examples = {e["question"] + e["chosen"]: e["fp32"] for e in results["export"].report["examples"]}
    shared = run_examples.keys() & export_examples.keys()
    assert sum(run_examples[k] == export_examples[k] for k in shared) >= len(shared) - 1


def test_eval_writes_json_tables_and_charts(root, results):
    _, run = root
    for result in results.values():
        assert result.report["kind"] == result.kind and result.plot.read_bytes().startswith(PNG)
    run_table = results["run"].table()
    assert "DPO reward accuracy" in run_table and "n/a (= reference)" in run_table and "win rate" in run_table
    export_table = results["export"].table()
    assert all(v in export_table for v in ("fp32", "q4f16", "int8"))
    # The run itself leaves its training curves (metrics.jsonl as a picture). The session's run is the demo's
    # (tests/conftest.py), whose output names the picture train returned (tests/test_cli.py).
    assert (run.run_dir / "training.png").read_bytes().startswith(PNG)


def test_a_sample_limit_and_an_explicit_split(root, tiny_config):
    """(After the tests of the demo's eval.json: this writes the run's again.)"""
    root, run = root
    [result] = evaluate(tiny_config(**{"eval.export": "none", "eval.split": "test[:8]", "eval.max_samples": 4}))
    assert result.report["samples"] == 4 and result.report["split"] == "builtin:tiny:test[:8]"
    assert result.kind == "run" and result.path == run.run_dir / "eval.json"
    assert json.loads(result.path.read_text()) == json.loads(json.dumps(result.report))
    assert result.plot == result.path.with_suffix(".png") and result.plot.read_bytes().startswith(PNG)


@pytest.mark.parametrize("overrides,message", [
    ({"eval.split": "validation"}, "split 'validation'.*validation"),
    ({"eval.split": "test[5:5]"}, "no rows"),
    ({"eval.split": None, "data.eval_split": None}, "no held-out split"),
    ({"run.name": "nothing-here"}, "nothing to evaluate"),
    ({"eval.run": "none", "eval.variants": ["q4", "fp32"], "export.name": "fp32-only"}, "no q4 variant"),
    ({"eval.run": "missing-run"}, "eval.run"),
])
def test_bad_input_is_a_clear_error(root, tiny_config, overrides, message):
    root, _ = root
    if overrides.get("export.name") == "fp32-only":
        only = root / "exports" / "fp32-only"
        if not only.exists():
            shutil.copytree(root / "exports" / "tiny", only)
            for graph in GRAPHS:
                graph_path(only, graph, "q4").unlink()
    with pytest.raises(EvalError, match=message):
        evaluate(tiny_config(**overrides))


def test_a_base_model_from_a_local_folder_on_a_local_data_file(root, tiny_config, tmp_path, tiny_bundle):
    """No run needed: eval.run=base scores model.id (here a local folder; a hub id works the same way) on any
    preference data smolbox reads (here one parquet file, whose split takes the name it is given)."""
    root, _ = root
    data = tmp_path / "pairs.parquet"
    shutil.copy(tiny_bundle / "data" / "data" / "test-00000-of-00001.parquet", data)
    cfg = tiny_config(**{"model.id": str(tiny_bundle / "model"), "data.id": str(data), "eval.run": "base",
                           "eval.export": "none", "eval.split": "heldout[:6]", "run.name": "base-only"})
    [result] = evaluate(cfg)
    assert result.path == root / "runs" / "base-only" / "eval-base.json"
    report = result.report
    assert report["samples"] == 6 and report["adapter"] is None and report["model_id"] == str(tiny_bundle / "model")
    assert 0 <= report["base"]["greedy"]["exact"] <= 1 and "n/a" in result.table()


def test_an_export_without_any_variant_is_refused(root, tiny_config, tmp_path):
    root, _ = root
    empty = tmp_path / "empty-export"
    (empty / "onnx").mkdir(parents=True)
    shutil.copy(root / "exports" / "tiny" / "config.json", empty)
    with pytest.raises(EvalError, match="no ONNX variant"):
        evaluate(tiny_config(**{"eval.run": "none", "eval.export": str(empty)}))


def test_scores():
    assert word_f1("A pink square.", "a pink  square") == 1.0
    assert word_f1("A red square.", "A pink square.") == pytest.approx(2 / 3)
    assert token_agreement([[1, 2, 3]], [[1, 2, 4, 5]]) == 0.5
