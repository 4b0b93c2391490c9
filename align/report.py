"""`align report RUN_DIR`: training curves, reward-vs-KL and sample tables, as PNGs and one
self-contained report.html (images embedded, opens offline).

RUN_DIR is a recipe's output_dir (one sub-directory per stage) or a single stage output. Any
stage directory with a metrics.jsonl is plotted; every finished stage (a directory, or a file
with its FILE.align.json beside it: best-of-n, critique, label, label-steps, generate) adds the
numbers of its manifest; eval JSON files add theirs (pairwise accuracy included) and their
model-vs-reference sample tables.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from align.checkpoints import MANIFEST, METRICS, atomic_write_text, read_manifest, read_records
from align.data import last_text
from align.errors import OutputError
from align.stages import STAGES



def stage_dirs(run_dir: Path) -> list[Path]:
    """The stage outputs that are directories: with training curves (a metrics.jsonl) or a manifest."""
    candidates = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []
    return [p for p in candidates if (p / METRICS).is_file() or (p / MANIFEST).is_file()]


def stage_files(run_dir: Path) -> list[tuple[Path, dict]]:
    """The stage outputs that are one file (FILE.align.json beside FILE), with their manifests."""
    found = []
    for sidecar in sorted(run_dir.glob(f"*.{MANIFEST}")) if run_dir.is_dir() else []:
        output = sidecar.with_name(sidecar.name.removesuffix(f".{MANIFEST}"))
        manifest = read_manifest(output)
        if manifest is not None:
            found.append((output, manifest))
    return found


def write_report(run_dir: Path) -> Path:
    stages, files = stage_dirs(run_dir), stage_files(run_dir)
    evaluations = ([path for path in sorted(run_dir.glob("*.json")) if not path.name.endswith(f".{MANIFEST}")]
                   if run_dir.is_dir() else [])
    if not (stages or files or evaluations):
        raise OutputError(f"{run_dir}: no stage output here (a directory with a {METRICS} or an {MANIFEST}, or a file with "
                          f"FILE.{MANIFEST} beside it); point align report at a run directory")
    import matplotlib

    matplotlib.use("Agg")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    sections = []
    for stage_dir in stages:
        manifest = read_manifest(stage_dir) or {}
        kind = manifest.get("stage") or _guess_kind(stage_dir)
        stage = STAGES.get(kind)
        records = read_records(stage_dir / METRICS) if (stage_dir / METRICS).is_file() else []
        curves = stage.curves if stage else ()
        images = [_plot_curves(records, keys, out / f"{stage_dir.name}-{i}.png", stage_dir.name) for i, keys in enumerate(curves)]
        if stage and stage.reward_vs_kl:
            images.append(_plot_reward_vs_kl(records, out / f"{stage_dir.name}-reward-vs-kl.png"))
        samples = _ppo_samples(stage_dir) if kind == "ppo" else []  # best-of-n writes a samples.jsonl of another shape
        sections.append(_section(stage_dir, kind, manifest, [i for i in images if i], samples))
    for output, manifest in files:
        if manifest.get("stage") != "eval":  # an eval's numbers are in its JSON, below
            sections.append(_section(output, manifest.get("stage", ""), manifest, [], []))
    for evaluation in evaluations:
        sections.append(_eval_section(evaluation))
    page = out / "report.html"
    atomic_write_text(page, _page(run_dir, [s for s in sections if s]))
    return page


def _guess_kind(stage_dir: Path) -> str:
    return next((name for name, stage in STAGES.items() if stage.curves and name in stage_dir.name), "")


def _plot_curves(records: list[dict], keys: tuple[str, ...], path: Path, title: str) -> Path | None:
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_title(f"{title}: {', '.join(series)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_reward_vs_kl(records: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    points = [(r["kl"], r["score"], r["step"]) for r in records if "kl" in r and "score" in r]
    if not points:
        return None
    kl, score, step = zip(*points)
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
    dots = ax.scatter(kl, score, c=step, cmap="viridis", s=18)
    fig.colorbar(dots, ax=ax, label="update")
    ax.set_xlabel("KL to reference (per response)")
    ax.set_ylabel("reward model score")
    ax.set_title("reward vs KL", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _ppo_samples(stage_dir: Path) -> list[dict]:
    path = stage_dir / "samples.jsonl"
    if not path.is_file():
        return []
    rows = read_records(path)
    if not rows:
        return []
    first, last = rows[0]["step"], rows[-1]["step"]
    return [r for r in rows if r["step"] in (first, last)]


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _metrics_table(metrics: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in metrics.items() if isinstance(v, (int, float))
    )
    return f"<table class=metrics>{rows}</table>" if rows else ""


def _section(stage_dir: Path, kind: str, manifest: dict, images: list[Path], samples: list[dict]) -> str:
    head = f"<h2>{html.escape(stage_dir.name)} <small>{html.escape(kind)}</small></h2>"
    base = f"<p>from <code>{html.escape(str(manifest.get('base_model', '?')))}</code></p>" if manifest else ""
    table = ""
    if samples:
        body = "".join(
            f"<tr><td>{r['step']}</td><td>{html.escape(last_text(r['prompt']))}</td><td>{html.escape(r['completion'])}</td>"
            f"<td>{r['score']:.3f}</td></tr>" for r in samples
        )
        table = f"<h3>samples: first and last update</h3><table><tr><th>update</th><th>prompt</th><th>completion</th><th>score</th></tr>{body}</table>"
    return head + base + _metrics_table(manifest.get("metrics", {})) + "".join(_img(i) for i in images) + table


def _eval_section(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return ""
    if not isinstance(data, dict) or "model" not in data:  # not an eval's output
        return ""
    body = "".join(
        f"<tr><td>{html.escape(str(r.get('prompt', '')))}</td><td>{html.escape(str(r.get('reference') or ''))}</td>"
        f"<td>{html.escape(str(r.get('completion', '')))}</td></tr>" for r in data.get("table", [])
    )
    numbers = {k: v for k, v in data.items() if isinstance(v, (int, float))}
    numbers |= {f"{k}/{inner}": v for k, group in data.items() if isinstance(group, dict)  # pairs: accuracy, count, ...
                for inner, v in group.items() if isinstance(v, (int, float))}
    against = f" against {html.escape(str(data['reference']))}" if data.get("reference") else ""
    table = f"<table><tr><th>prompt</th><th>before (reference)</th><th>after (model)</th></tr>{body}</table>" if body else ""
    return (f"<h2>{html.escape(path.name)} <small>eval of {html.escape(str(data.get('model')))}{against}</small></h2>"
            f"{_metrics_table(numbers)}{table}")


def _page(run_dir: Path, sections: list[str]) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:49%;margin:4px 0}table{border-collapse:collapse;margin:8px 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "table.metrics td:last-child{text-align:right;font-family:monospace}small{color:#777;font-weight:normal}"
    )
    return (f"<!doctype html><html><head><meta charset=utf-8><title>align report: {html.escape(str(run_dir))}</title>"
            f"<style>{style}</style></head><body><h1>align report: {html.escape(str(run_dir))}</h1>{''.join(sections)}</body></html>\n")
