"""bench/gpu_check.sh's CPU-runnable part: the same align stages as on a GPU, on the tiny model."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    checks = json.loads(out.read_text())["checks"]
    assert {"sft_auto", "rm_auto", "ppo_auto", "dpo_auto", "ppo_qlora", "ppo_fp16_full", "ppo_fp16_lora", "ppo_matched",
            "ppo_full_auto", "prm_pairwise_auto", "prm_pairwise_qlora", "eval_prm_pairs", "best_of_n_prm", "ppo_dense_prm",
            "label_steps", "merge_rm"} <= set(checks)
    assert all(c["status"] == "ok" for c in checks.values())
    assert all(c["finite"] for name, c in checks.items() if "metrics" in c)
    assert "full fine-tuning cannot train float16 weights" in checks["sft_fp16_weights_full_refused"]["refused_with"]
    assert len(checks["ppo_full_auto"]["kl_per_update"]) == 2 and checks["ppo_full_auto"]["kl_per_update"][-1] > 0
    assert checks["ppo_matched"]["episodes_per_second"] > 0 and checks["ppo_matched"]["mfu_update"]["train_tflops"] > 0
