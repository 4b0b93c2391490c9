import json
import re

from conftest import assert_clean_failure


def test_report_plots_every_stage_into_one_offline_page(align, tmp_path):
    run = tmp_path / "run"
    for name, records in {
        "sft": [{"step": s, "loss": 3.0 - s * 0.1, "eval_loss": 3.1 - s * 0.1} for s in range(1, 6)],
        "ppo": [{"step": s, "score": 0.1 * s, "kl": 0.05 * s, "policy_loss": 0.0, "value_loss": 0.1} for s in range(1, 6)],
    }.items():
        (run / name).mkdir(parents=True)
        (run / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "ppo" / "samples.jsonl").write_text(json.dumps({"step": 1, "prompt": "hi <b>", "completion": "yo", "score": 0.5}) + "\n")
    (run / "eval.json").write_text(json.dumps({"model": "m", "reference": "r", "kl": 0.2, "table": [
        {"prompt": "p", "completion": "after", "reference": "before"}]}))
    result = align("report", run)
    assert result.code == 0, result.err
    page = (run / "report" / "report.html").read_text()
    assert "http" not in page.replace("<!doctype html>", "")  # nothing fetched from the network
    # sft: loss; ppo: score, kl, losses (no entropy or length logged here), and reward-vs-KL
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 1 + 3 + 1
    assert "hi &lt;b&gt;" in page and ">before<" in page and ">after<" in page
    assert (run / "report" / "ppo-reward-vs-kl.png").stat().st_size > 1000


def test_report_on_a_directory_without_metrics(align, tmp_path):
    assert_clean_failure(align("report", tmp_path), 5, "no stage output with a metrics.jsonl")
