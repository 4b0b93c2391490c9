"""Nothing lost, nobody let in: disk trouble mid-run, torn logs, secrets kept out of every output."""

from __future__ import annotations

import errno

from conftest import assert_clean_failure

SECRETS = {"HF_TOKEN": "hf_secret_token_0001", "WANDB_API_KEY": "wandb-secret-0002", "ALIGN_JUDGE_API_KEY": "sk-secret-0003"}


def test_a_full_disk_mid_run_is_one_line_and_leaves_nothing_finished(align, sft_file, tmp_path, monkeypatch):
    from align import training

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "align.json"))

    monkeypatch.setattr(training, "write_manifest", full)
    out = tmp_path / "out"
    result = align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--max-steps", "2", "--set", "train.save_steps=1")
    assert_clean_failure(result, 5, "no space left on the device", "align.json", "--resume")
    assert not (out / "align.json").exists() and (out / "checkpoints" / "checkpoint-2").is_dir()


def test_a_full_disk_while_safetensors_writes_the_weights_is_one_line(align, sft_file, tmp_path, monkeypatch):
    # safetensors writes in Rust and raises its own error, not an OSError, with the OS's code in the text.
    from safetensors import SafetensorError

    from align import training

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(training, "save_stage_model", full)
    result = align("sft", "-m", "tiny", "-d", sft_file, "-o", tmp_path / "out", "--max-steps", "1")
    assert_clean_failure(result, 5, "no space left on the device", "writing model weights", "--resume")


def test_permission_denied_mid_run_is_one_line(align, sft_file, tmp_path, monkeypatch):
    from align import training

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(training, "save_stage_model", denied)
    assert_clean_failure(align("sft", "-m", "tiny", "-d", sft_file, "-o", tmp_path / "out", "--max-steps", "1"),
                         5, "permission denied", "model.safetensors")


def test_secrets_never_reach_outputs_or_logs(align, sft_file, ppo_prompts, reward_file, tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    runs = [
        align("sft", "-m", "tiny", "-d", sft_file, "-o", tmp_path / "sft", "--max-steps", "2", "--set", "train.save_steps=1"),
        align("ppo", "-m", "tiny", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e", "-o", tmp_path / "ppo",
              "--episodes", "8", "--batch-size", "4", "--max-new-tokens", "4", "--set", "train.save_steps=1"),
        align("eval", "-m", tmp_path / "ppo", "-p", ppo_prompts, "--reward-fn", f"{reward_file}:share_of_e",
              "-o", tmp_path / "eval.json", "--max-new-tokens", "4"),
        align("report", tmp_path),
    ]
    assert all(r.code == 0 for r in runs), [r.err for r in runs]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 20
    for value in SECRETS.values():
        assert all(value not in r.out + r.err for r in runs)
        leaked = [p for p in written if value.encode() in p.read_bytes()]
        assert not leaked, leaked


def test_a_report_reads_a_log_torn_by_a_killed_run(align, sft_file, tmp_path):
    out = tmp_path / "sft"
    assert align("sft", "-m", "tiny", "-d", sft_file, "-o", out, "--max-steps", "2").code == 0
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"stage": "sft", "step": 3, "lo')
    result = align("report", tmp_path)
    assert result.code == 0, result.err
    assert (tmp_path / "report" / "report.html").is_file()

