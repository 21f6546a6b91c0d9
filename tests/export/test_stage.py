"""The export stage on the session's tiny run: parity.json and the manifest, and what it refuses or survives (an
existing folder, an incomplete run, a full disk, a SIGKILL half way)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from smolbox.export import ExportError, export
from smolbox.export.stage import check_disk

VARIANTS = ["fp32", "fp16", "q8", "q4", "q4f16", "int8"]


def test_parity_report_and_manifest(tiny_export, tiny_run):
    parity = json.loads((tiny_export.folder / "parity.json").read_text())
    assert set(parity["variants"]) == set(VARIANTS)
    fp32 = parity["variants"]["fp32"]
    assert fp32["ok"] and fp32["greedy_agreement"] == 1.0 and fp32["max_logit_diff_prefill"] < 1e-4
    for entry in parity["variants"].values():
        assert {"max_logit_diff_prefill", "max_logit_diff_decode", "greedy_agreement", "ok"} <= set(entry)
    manifest = json.loads((tiny_export.folder / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "run" and manifest["merge_into"] == "dequantized_nf4"
    run_manifest = tiny_run.run_dir / "manifest.json"
    assert manifest["source"]["run"]["manifest"] == str(run_manifest.resolve())
    listed = {f["path"]: f for f in manifest["files"]}
    assert "onnx/decoder_model_merged_q4.onnx" in listed
    import hashlib

    sample = listed["onnx/decoder_model_merged.onnx_data"]
    assert sample["sha256"] == hashlib.sha256((tiny_export.folder / sample["path"]).read_bytes()).hexdigest()
    assert manifest["parity_flagged"] == [v for v in VARIANTS if not parity["variants"][v]["ok"]]


def test_existing_export_is_not_replaced_silently(tiny_export, tiny_config):
    with pytest.raises(ExportError, match="already exists"):
        export(tiny_config())


def test_incomplete_run_is_refused(tiny_root, tiny_config):
    run = tiny_root / "runs" / "half"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(ExportError, match="has not completed"):
        export(tiny_config(**{"export.source": str(run), "export.name": "half"}))


def test_full_disk_is_a_clear_error(tiny_run, tiny_config, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        with pytest.raises(ExportError, match="not enough disk"):
            export(tiny_config(**{"export.output_dir": str(small), "export.name": "full"}))
        assert not [p for p in small.iterdir()], "nothing may be left on the full disk"
    finally:
        subprocess.run(["umount", str(small)])


def test_disk_estimate_refuses_a_model_that_cannot_fit(tmp_path):
    huge = torch.nn.Linear(10**6, 10**6, bias=False, device="meta")  # 1e12 parameters, no memory
    with pytest.raises(ExportError, match="not enough disk"):
        check_disk(tmp_path, huge, VARIANTS)


@pytest.mark.slow  # an export process of its own, killed mid-export
def test_sigkill_mid_export_leaves_no_complete_looking_folder(tiny_run, tiny_root, tiny_config):
    args = [sys.executable, "-m", "smolbox", "export", "--config", "tiny", "--env-file", "",
            "--run.output_dir", str(tiny_root / "runs"), "--run.name", tiny_run.run_dir.name,
            "--export.output_dir", str(tiny_root / "exports"), "--export.name", "killed"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        partial = list((tiny_root / "exports").glob(".killed.partial-*/onnx/vision_encoder.onnx"))
        if partial:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "export ended before it could be killed"
    assert not (tiny_root / "exports" / "killed").exists()
    assert list((tiny_root / "exports").glob(".killed.partial-*")), "the partial folder is hidden, not final"

    done = export(tiny_config(**{"run.name": tiny_run.run_dir.name, "export.name": "killed", "export.variants": ["fp32"]}))
    assert done.folder == tiny_root / "exports" / "killed" and (done.folder / "manifest.json").is_file()
    assert not list((tiny_root / "exports").glob(".killed.partial-*")), "a new export clears the stale partial folder"
