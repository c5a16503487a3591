"""`atlasvid-dist world ...`: the shapes world's commands (`world train`: train the shapes model from scratch;
`world decoder`: run the recipe's decoder-only VAE stages on a folder made without them)."""

from __future__ import annotations

import typer

world_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="The shapes world: train the shapes model on it."
)


@world_app.command("train")
def world_train(
    output: str = typer.Option(..., "--output", help="Folder for the model (diffusers layout) and its checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed of every init and draw (the run is reproducible from it)."),
    budget: str = typer.Option(
        "full",
        "--budget",
        help="tiny (about a minute, for tests) | short (few steps at full size) | full (the real recipe, "
        "within an hour on 2 CPU cores; the shipped model) | wide (a wider transformer with a single-frame phase; "
        "measured worse, docs/shapes.md).",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in a non-empty OUTPUT."),
) -> None:
    """Train the shapes model (VAE, then transformer) from scratch on world clips; writes a model folder."""
    import torch

    from ..world.train import WorldTrainConfig, train_world_model

    cfg = WorldTrainConfig(output=output, seed=seed, budget=budget, resume=resume)
    torch.manual_seed(seed)
    train_world_model(cfg, log=lambda line: typer.echo(line))


@world_app.command("decoder")
def world_decoder(
    model: str = typer.Option(
        ..., "--model", help="A model folder made by `world train` without (all) the decoder stages."
    ),
    budget: str = typer.Option("full", "--budget", help="The budget whose decoder stages to run (full has them)."),
) -> None:
    """Fine-tune a model folder's VAE decoder in place (encoder frozen: latents and all trained on them unchanged)."""
    from ..world.decoder import WorldDecoderConfig, finetune_decoder

    cfg = WorldDecoderConfig(model=model, budget=budget)
    finetune_decoder(cfg, log=lambda line: typer.echo(line))
