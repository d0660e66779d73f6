"""``dp score``."""

from pathlib import Path

from dpcli.cli.options import (
    Adapter,
    BatchSize,
    CalibSize,
    Chunk,
    Config,
    Criterion,
    Data,
    HeadRatio,
    Ignore,
    Json,
    ModelArgument,
    Output,
    Plot,
    Prompt,
    RoundTo,
    Scheduler,
    Seed,
    Threshold,
    Timesteps,
)


def score(
    model: ModelArgument,
    criterion: Criterion = "diff-taylor",
    data: Data = None,
    threshold: Threshold = None,
    batch_size: BatchSize = 256,
    calib_size: CalibSize = 32,
    chunk: Chunk = None,
    timesteps: Timesteps = None,
    prompt: Prompt = None,
    seed: Seed = 0,
    ignore: Ignore = None,
    round_to: RoundTo = None,
    head_ratio: HeadRatio = 0.0,
    output: Output = None,
    plot: Plot = None,
    adapter: Adapter = None,
    config: Config = None,
    scheduler: Scheduler = None,
    json_output: Json = False,
) -> None:
    """Compute channel importance (and the per-timestep loss curve with its cutoff); save it for dp prune."""
    from dpcli import output as out
    from dpcli.cli.common import scan_progress
    from dpcli.jobs.score import ScoreSettings, compute_scores, save_scores
    from dpcli.loading import load_model
    from dpcli.plots import plot_losses
    from dpcli.plugins import get_registry
    from dpcli.pruning import PruneOptions

    target = Path(output) if output else None
    if target is not None and target.is_dir():
        out_error = f"--output {target} is a folder; give a file name such as scores.safetensors"
        from dpcli.errors import BadInput

        raise BadInput(out_error)
    settings = ScoreSettings(
        criterion=criterion,
        data=data,
        threshold=threshold,
        calib_size=calib_size,
        batch_size=batch_size,
        chunk=chunk,
        timesteps=timesteps,
        seed=seed,
        prompt=prompt,
        options=PruneOptions(ignore=list(ignore or []), round_to=round_to, head_ratio=head_ratio),
    )
    get_registry().criterion(criterion)  # an unknown name fails before the model is loaded
    with out.stderr.status("Loading model"):
        loaded = load_model(model, adapter=adapter, config=config, scheduler=scheduler)
    with scan_progress(loaded, settings) as on_progress:
        scores = compute_scores(loaded, settings, on_progress=on_progress)
    if target is not None:
        save_scores(scores, target, loaded.source)
    if plot is not None and scores.scan is not None:
        plot_losses(scores.scan, plot, title=f"{loaded.source}: {criterion}")
    report = score_report(scores, target, plot)
    if json_output:
        out.print_json(report)
    else:
        out.render_score(report)


def score_report(scores, target: Path | None, plot: Path | None) -> dict:
    """The JSON-ready summary of a scoring run."""
    import math

    scan = scores.scan
    layers = []
    for key, tensor in sorted(scores.tensors.items()):
        values = tensor.float()
        layers.append(
            {
                "group": key,
                "channels": values.numel(),
                "min": float(values.min()),
                "mean": float(values.mean()),
                "max": float(values.max()),
                "std": float(values.std()) if values.numel() > 1 else 0.0,
            }
        )
    return {
        "criterion": scores.criterion,
        "cutoff": scan.cutoff if scan else None,
        "losses": [loss if math.isfinite(loss) else None for loss in scan.losses] if scan else [],
        "threshold": scores.settings.get("threshold"),
        "timesteps_scanned": len(scan.losses) if scan else 0,
        "timesteps_total": scan.timesteps if scan else None,
        "forward_passes": scan.forward_passes if scan else 0,
        "chunk": scan.chunk if scan else None,
        "calib_size": scan.calib_size if scan else None,
        "seconds": scores.seconds,
        "scan_seconds": scan.seconds if scan else 0.0,
        "groups": len(scores.tensors),
        "output": str(target) if target else None,
        "plot": str(plot) if plot and scan else None,
        "layers": layers,
    }
