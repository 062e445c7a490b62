"""Recording a run: metrics to JSONL, the console and (optionally) wandb; evaluation samples."""
import json

from tqdm.auto import tqdm


def init_wandb(track: bool, project: str, name: str, config: dict, run_dir: str):
    """A wandb run when `track`, else None (wandb is imported only then)."""
    if not track:
        return None
    import wandb

    return wandb.init(project=project, name=name, config=config, dir=run_dir, save_code=True)


def log_metrics(metrics: dict, step: int, jsonl_path: str, wandb_run=None) -> None:
    """Append one line {"step": step, **metrics} to the run's JSONL file (and to wandb)."""
    with open(jsonl_path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if wandb_run is not None:
        wandb_run.log(metrics, step=step)


def write_samples(samples, path: str, step: int, wandb_run=None) -> None:
    """Append evaluation samples (dicts) to a JSONL file, each tagged with the step."""
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
    if wandb_run is not None and samples:
        import wandb

        keys = list(samples[0])
        wandb_run.log({"eval/samples": wandb.Table(columns=keys, data=[[s[k] for k in keys] for s in samples])},
                      step=step)


def format_samples(samples, n: int = 4, width: int = 70) -> str:
    """A small text table of the first `n` samples, for the console."""
    lines = []
    for s in samples[:n]:
        prompt = s["prompt"].replace("\n", " ")[:width]
        response = s["response"].replace("\n", " ")[:width]
        lines.append(f"  [{s['score']:+.2f}] {prompt!r} -> {response!r}")
    return "\n".join(lines)


def report(metrics: dict, samples, step: int, metrics_path: str, samples_path: str, wandb_run=None) -> None:
    """An evaluation's metrics and samples (or None) to their files and wandb, a summary of them to the console."""
    log_metrics(metrics, step, metrics_path, wandb_run)
    if samples is not None:
        write_samples(samples, samples_path, step, wandb_run)
    tqdm.write(f"[eval @ {step}] " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
               + ("\n" + format_samples(samples) if samples else ""))
