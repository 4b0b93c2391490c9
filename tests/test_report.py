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


def test_report_shows_the_stages_that_make_data_and_pairwise_evals(align, tmp_path):
    """Stages without training curves (best-of-n's directory, label-steps' file with its manifest
    beside it) show their manifest's numbers; an eval of a reward model on pairs (no sample table)
    shows its pairwise accuracy."""
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "samples.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c", "score": 1.0}) + "\n")
    (run / "best" / "align.json").write_text(json.dumps({"stage": "best-of-n", "base_model": "sft", "completed": True,
                                                         "metrics": {"mean_best_score": 0.875, "kept": 12}}))
    (run / "steps.jsonl").write_text("")
    (run / "steps.jsonl.align.json").write_text(json.dumps({"stage": "label-steps", "completed": True,
                                                            "metrics": {"steps_correct": 0.625}}))
    (run / "pairs.json").write_text(json.dumps({"model": "runs/prm", "reference": None, "pairs": {"accuracy": 0.8164, "count": 256}}))
    (run / "pairs.json.align.json").write_text(json.dumps({"stage": "eval", "completed": True, "metrics": {}}))
    result = align("report", run)
    assert result.code == 0, result.err
    page = (run / "report" / "report.html").read_text()
    assert "<h2>best <small>best-of-n</small></h2>" in page and "mean_best_score</td><td>0.875" in page
    assert "<h2>steps.jsonl <small>label-steps</small></h2>" in page and "steps_correct</td><td>0.625" in page
    assert "<h2>pairs.json <small>eval of runs/prm</small></h2>" in page and "pairs/accuracy</td><td>0.8164" in page
    assert page.count("<h2>") == 3  # the eval's manifest is not a section of its own


def test_report_on_a_directory_without_stage_outputs(align, tmp_path):
    assert_clean_failure(align("report", tmp_path), 5, "no stage output here")
