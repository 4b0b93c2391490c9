"""`align run`: stages chain, finished stages are skipped, changed ones need --overwrite."""

import json
import shutil

import pytest

from conftest import ROOT, assert_clean_failure


@pytest.fixture
def recipe(tmp_path):
    shutil.copytree(ROOT / "recipes" / "data", tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    text = (ROOT / "recipes" / "tiny.yaml").read_text().replace("output_dir: runs/tiny", f"output_dir: {tmp_path / 'runs'}")
    path.write_text(text)
    return path


def test_tiny_recipe_chains_every_stage_and_skips_them_on_rerun(align, recipe, tmp_path):
    result = align("run", recipe, "--set", "train.max_steps=2")
    assert result.code == 0, result.err
    runs = tmp_path / "runs"
    manifests = {name: json.loads((runs / name / "align.json").read_text()) for name in ("sft", "rm", "dpo")}
    assert manifests["rm"]["base_model"] == manifests["dpo"]["base_model"] == str(runs / "sft")
    assert manifests["dpo"]["input_run_id"] == manifests["sft"]["run_id"]
    assert (runs / "samples.jsonl").is_file() and (runs / "samples.jsonl.align.json").is_file()
    evaluation = json.loads((runs / "eval.json").read_text())
    assert evaluation["reference"] == str(runs / "sft") and "kl" in evaluation and "implicit_reward_accuracy" in evaluation["pairs"]
    assert (runs / "report" / "report.html").is_file() and "report:" in result.out
    assert "KL to reference:" in result.out and "reward (rm): " in result.out and "implicit reward accuracy" in result.out
    # The reward model's eval accuracy, recomputed: its own scores on the held-out pairs of the same split.
    from align.config import DataSpec, ModelSpec
    from align.data import PREFERENCE_FORMATS, last_text, load_split
    from align.rewards import RewardModel

    rm_config = manifests["rm"]["config"]
    _, _, held_out = load_split(DataSpec(**rm_config["data"]), PREFERENCE_FORMATS, rm_config["train"]["seed"])
    reward = RewardModel(ModelSpec(path=str(runs / "rm")))
    chosen = reward([r["prompt"] for r in held_out], [last_text(r["chosen"]) for r in held_out])
    rejected = reward([r["prompt"] for r in held_out], [last_text(r["rejected"]) for r in held_out])
    # TRL's RewardTrainer reports the mean of per-batch accuracies (eval batches of train.batch_size, in
    # order), not the accuracy over all pairs: with 11 held-out pairs in batches of 4 they differ.
    right, size = (chosen > rejected).float(), rm_config["train"]["batch_size"]
    per_batch = [right[i:i + size].mean().item() for i in range(0, len(right), size)]
    assert manifests["rm"]["metrics"]["eval_accuracy"] == pytest.approx(sum(per_batch) / len(per_batch))
    assert all(word in result.out for word in ("sft", "rm", "dpo", "ppo", "eval", "samples", "ran"))
    ppo = json.loads((runs / "ppo" / "align.json").read_text())
    assert ppo["input_run_id"] == f"{manifests['sft']['run_id']}+{manifests['rm']['run_id']}"

    again = align("run", recipe, "--set", "train.max_steps=2")
    assert again.code == 0 and again.out.count("skipped") == 6
    assert json.loads((runs / "sft" / "align.json").read_text())["run_id"] == manifests["sft"]["run_id"]

    changed = align("run", recipe, "--set", "train.max_steps=2", "--set", "dpo.dpo.beta=0.2")
    assert_clean_failure(changed, 5, "runs/dpo: holds a finished 'dpo' run, and its config changed since", "--overwrite")

    redone = align("run", recipe, "--set", "train.max_steps=2", "--set", "sft.train.learning_rate=5e-4", "--overwrite")
    assert redone.code == 0, redone.err
    # sft changed, so everything downstream of it was redone too, from the new sft output.
    assert redone.out.count("ran") == 6
    new = {name: json.loads((runs / name / "align.json").read_text()) for name in ("sft", "dpo")}
    assert new["dpo"]["input_run_id"] == new["sft"]["run_id"] != manifests["sft"]["run_id"]


def test_interrupted_stage_needs_resume(align, recipe, tmp_path):
    (tmp_path / "runs" / "sft" / "checkpoints").mkdir(parents=True)
    result = align("run", recipe, "--set", "train.max_steps=1")
    assert_clean_failure(result, 5, "unfinished 'sft' run", "--resume")


def test_dry_run_lists_stages_without_running(align, recipe, tmp_path):
    result = align("run", recipe, "--dry-run")
    assert result.code == 0
    assert [line.split()[0] for line in result.out.splitlines()] == ["sft", "rm", "dpo", "ppo", "eval", "samples"]
    assert not (tmp_path / "runs").exists()


def test_models_command_lists_builtins(align, tiny_model):
    result = align("models")
    assert result.code == 0
    assert "tiny" in result.out and "smollm2-135m-instruct" in result.out and "ready" in result.out


def test_version_and_help(align):
    from align import __version__

    assert align("--version").out.strip() == f"align {__version__}"
    for command in ("sft", "rm", "dpo", "ppo", "grpo", "rloo", "generate", "eval", "report", "merge", "run", "models"):
        result = align(command, "--help")
        assert result.code == 0 and "Usage:" in result.out


def test_a_recipe_beside_its_relative_outputs_skips_them_on_rerun(align, tmp_path, sft_file, prompts_file, monkeypatch):
    """Stage outputs handed on by from: stay as written; resolving them against the recipe once
    they exist made every rerun look like a changed config."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: here\noutput_dir: runs\nmodel: tiny\nstages:\n"
        f"  - {{name: sft, data: {sft_file}, train: {{max_steps: 1}}}}\n"
        f"  - {{name: eval, stage: eval, from: sft, prompts: {prompts_file}, sampling: {{max_new_tokens: 2}}}}\n"
    )
    assert align("run", recipe).code == 0
    again = align("run", recipe)
    assert again.code == 0, again.err
    assert again.out.count("skipped") == 2
    assert json.loads((tmp_path / "runs" / "eval.json.align.json").read_text())["config"]["model"]["path"] == "runs/sft"


def test_the_summary_of_reward_model_evals_names_no_reference_and_shows_step_metrics(align, tmp_path, pairs_file, steps_file,
                                                                                       monkeypatch):
    """A reward model's pairs and a PRM's stepwise rows evaluated in a recipe: 'X against None' was printed."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: rms\noutput_dir: runs\nmodel: tiny\nstages:\n"
        f"  - {{name: rm, data: {pairs_file}, train: {{max_steps: 1}}}}\n"
        f"  - {{name: prm, data: {steps_file}, train: {{max_steps: 1}}}}\n"
        f"  - {{name: rm-pairs, stage: eval, from: rm, pairs: {pairs_file}}}\n"
        f"  - {{name: prm-steps, stage: eval, from: prm, pairs: {steps_file}}}\n"
    )
    result = align("run", recipe)
    assert result.code == 0, result.err
    assert "None" not in result.out and "rm-pairs: runs/rm\n" in result.out and "prm-steps: runs/prm\n" in result.out
    assert "accuracy on pairs:" in result.out and "steps: accuracy" in result.out and "AUROC" in result.out


def test_a_recipe_named_by_another_path_to_the_same_file_is_still_up_to_date(align, tmp_path, monkeypatch):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": "Bye"}\n')
    (tmp_path / "gen.yaml").write_text(
        "output_dir: runs\nmodel: tiny\nstages:\n  - {name: samples, stage: generate, prompts: prompts.jsonl, "
        "sampling: {max_new_tokens: 4}}\n")
    monkeypatch.chdir(tmp_path)
    first = align("run", "gen.yaml")
    assert first.code == 0, first.err
    manifest = json.loads((tmp_path / "runs" / "samples.jsonl.align.json").read_text())
    assert manifest["config"]["prompts"]["path"] == str(tmp_path / "prompts.jsonl")
    for same in ("./gen.yaml", str(tmp_path / "gen.yaml")):
        again = align("run", same)
        assert again.code == 0 and "skipped" in again.out, again.err


def moved_project(tmp_path, sft_file, prompts_file):
    """A project directory: its data, a reward function file beside the recipe, and a recipe naming them relatively."""
    project = tmp_path / "here"
    project.mkdir()
    shutil.copy(sft_file, project / "sft.jsonl")
    shutil.copy(prompts_file, project / "prompts.jsonl")
    (project / "score.py").write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    (project / "recipe.yaml").write_text(
        "name: here\noutput_dir: runs\nmodel: tiny\nstages:\n"
        "  - {name: sft, data: sft.jsonl, train: {max_steps: 1}}\n"
        "  - {name: eval, stage: eval, from: sft, prompts: prompts.jsonl, reward_fns: [score.py:length],"
        " sampling: {max_new_tokens: 2}}\n")
    return project


def test_a_project_moved_elsewhere_finds_its_finished_stages_up_to_date(align, tmp_path, sft_file, prompts_file, monkeypatch):
    """Paths inside the directory align runs from (data files, a reward function's file) count relative to
    it, so a project moved or copied, runs and all (another disk, a GPU machine), reruns nothing; changed
    data is still a change."""
    project = moved_project(tmp_path, sft_file, prompts_file)
    monkeypatch.chdir(project)
    assert align("run", "recipe.yaml").code == 0
    assert json.loads((project / "runs" / "eval.json.align.json").read_text())["config"]["prompts"]["path"] == str(project / "prompts.jsonl")
    moved = tmp_path / "elsewhere" / "there"
    moved.parent.mkdir()
    shutil.move(project, moved)
    monkeypatch.chdir(moved)
    again = align("run", "recipe.yaml")
    assert again.code == 0, again.err
    assert again.out.count("skipped") == 2
    (moved / "prompts.jsonl").write_text('{"prompt": "Something else."}\n')
    assert_clean_failure(align("run", "recipe.yaml"), 5, "runs/eval.json", "its data changed (prompts.jsonl)")


def test_outputs_finished_before_paths_counted_relative_to_the_project_stay_up_to_date(align, tmp_path, sft_file, prompts_file,
                                                                                       monkeypatch):
    """Manifests written with absolute paths in the config hash and data fingerprint (align before this
    change) still count as up to date where they are."""
    from align import checkpoints

    project = moved_project(tmp_path, sft_file, prompts_file)
    monkeypatch.chdir(project)
    with monkeypatch.context() as old:
        old.setattr(checkpoints, "in_project", lambda value: value)  # what align wrote before
        assert align("run", "recipe.yaml").code == 0
    again = align("run", "recipe.yaml")
    assert again.code == 0, again.err
    assert again.out.count("skipped") == 2


def test_a_changed_reward_function_file_makes_its_stage_out_of_date(align, tmp_path, sft_file, prompts_file, monkeypatch):
    """The files of the python functions a stage calls are compared by content like its data: editing
    score.py (the eval's reward function) makes the eval out of date, and nothing else; a manifest
    written before code files were fingerprinted stays up to date."""
    project = moved_project(tmp_path, sft_file, prompts_file)
    monkeypatch.chdir(project)
    assert align("run", "recipe.yaml").code == 0
    manifest = json.loads((project / "runs" / "eval.json.align.json").read_text())
    assert manifest["code_fingerprint"] != json.loads((project / "runs" / "sft" / "align.json").read_text())["code_fingerprint"]
    assert align("run", "recipe.yaml").out.count("skipped") == 2
    score, sft = (project / "score.py").read_text(), (project / "sft.jsonl").read_text()
    changed = "def length(prompts, completions):\n    return [-float(len(c)) for c in completions]\n"
    (project / "score.py").write_text(changed)
    assert_clean_failure(align("run", "recipe.yaml"), 5, "runs/eval.json: holds a finished 'eval' run",
                         "a file of code or settings it reads changed (score.py)", "--overwrite")
    listed = align("run", "recipe.yaml", "--dry-run").out.splitlines()
    assert "(up to date)" in listed[0] and "(to run: a file of code or settings it reads changed (score.py))" in listed[1]
    (project / "sft.jsonl").write_text((project / "sft.jsonl").read_text() + (project / "sft.jsonl").read_text())
    listed = align("run", "recipe.yaml", "--dry-run").out.splitlines()  # sft runs again, so eval after it
    assert "(to run: its data changed (sft.jsonl))" in listed[0] and "(to run: a file of code" in listed[1]
    (project / "score.py").write_text(score)
    listed = align("run", "recipe.yaml", "--dry-run").out.splitlines()
    assert "(to run: its data changed (sft.jsonl))" in listed[0] and "(to run: it reads sft, which runs before it)" in listed[1]
    (project / "sft.jsonl").write_text(sft)
    (project / "score.py").write_text(changed)
    redone = align("run", "recipe.yaml", "--overwrite")
    assert redone.code == 0, redone.err
    assert redone.out.count("skipped") == 1 and redone.out.count("ran") == 1  # sft was not redone
    (project / "score.py").write_text("def length(prompts, completions):\n    return [0.0 for c in completions]\n")
    del manifest["code_fingerprint"]  # as align wrote it before
    (project / "runs" / "eval.json.align.json").write_text(json.dumps(manifest))
    assert align("run", "recipe.yaml").out.count("skipped") == 2


def test_code_files_are_the_functions_files_templates_and_constitutions(tmp_path, monkeypatch):
    from align.checkpoints import code_files
    from align.config import EvalConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "score.py").write_text("def f(p, c):\n    return [0.0] * len(c)\n")
    (tmp_path / "template.jinja").write_text("{{ messages }}")
    (tmp_path / "scoring").mkdir()
    (tmp_path / "scoring" / "__init__.py").write_text("")
    (tmp_path / "scoring" / "rules.py").write_text("def g(p, c):\n    return [1.0] * len(c)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = EvalConfig(model={"path": "tiny", "chat_template": "template.jinja"}, prompts={"path": "p.jsonl"},
                        output="e.json", reward_fns=["score.py:f", "scoring.rules:g", "missing.py:h", "no_such_module:h"])
    assert code_files(config) == sorted(["score.py", "template.jinja", str(tmp_path / "scoring" / "rules.py")])
