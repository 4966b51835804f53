"""``dedn train``: one DEDN run under the honest protocol, with the paper protocol and ESZSL beside it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from dedn.config import TrainConfig
    from dedn.data.store import FeatureStore
    from dedn.train import FitResult

__all__ = ["train"]

_COMMAND = "dedn train"  # the name its output folders' marker carries


def _row(name: str, m: dict[str, float] | None, extra: str = "") -> str:
    if m is None:
        return f"{name:<58} {'-':>6} {'-':>6} {'-':>6} {'-':>6}"
    return (
        f"{name:<58} {100 * m['U']:>6.1f} {100 * m['S']:>6.1f} {100 * m['H']:>6.1f} {100 * m.get('T', float('nan')):>6.1f}"
        + (f"  {extra}" if extra else "")
    )


@click.command()
@click.option(
    "--config", "-c", "config_path", type=click.Path(path_type=Path), required=True, help="YAML config under configs/."
)
@click.option("--store", type=click.Path(path_type=Path), default=None, help="Feature store (overrides data.store).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value; repeatable.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint folder to create for the final model (default runs/<config name>).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing --out folder, only if it is a previous dedn train checkpoint.",
)
@click.option(
    "--baseline",
    type=click.Choice(["none", "eszsl"]),
    default="none",
    show_default=True,
    help="Also report a classical baseline on the same splits.",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(
    config_path: Path,
    store: Path | None,
    overrides: tuple[str, ...],
    out: Path | None,
    overwrite: bool,
    baseline: str,
    no_progress: bool,
) -> None:
    """Train DEDN: select the epoch on validation, retrain on trainval, test once.

    Each epoch prints validation U/S/H; the inference parameters (lambda_rc, lambda_e, c) are also
    scored over a grid from cached expert outputs. The end table shows the honest test figures, the
    paper's protocol (best over epochs on test, labelled), and ESZSL with --baseline eszsl.

    \b
    Examples:
      dedn train -c configs/tiny.yaml --store data/tiny
      dedn train -c configs/cub.yaml --store data/synth-cub --set optim.epochs=5 --set model.clusters=half
      dedn train -c configs/awa2.yaml --set fidelity=released --set ablation=no_distill --baseline eszsl
    """
    from dedn.config import load_config
    from dedn.errors import config_named
    from dedn.outputs import check_output

    sets = list(overrides) + ([f"data.store={store}"] if store is not None else [])
    cfg = load_config(config_path, sets)  # before torch is imported: a bad config is refused at once
    folder = out or Path("runs") / config_path.stem
    # before any work: the checkpoint folder never replaces the config, the store, the working folder
    check_output(folder, inputs=[config_path, cfg.data.store], command=_COMMAND, overwrite=overwrite, kind="folder")
    from dedn.build import check_compatible
    from dedn.data import open_store
    from dedn.device import resolve_device
    from dedn.train import fit_and_test

    ds = open_store(cfg.data.store)

    with config_named(config_path):
        check_compatible(cfg.effective(), ds)
        resolve_device(cfg.device)  # cuda asked on a machine without it: refused before any output
    click.echo(
        f"dataset {ds.meta.name} ({ds.meta.fingerprint}), C={ds.meta.channels} {ds.meta.height}x{ds.meta.width}, "
        f"fidelity={cfg.fidelity}, ablation={cfg.ablation}"
    )
    with config_named(config_path):
        result = fit_and_test(cfg, ds, progress=not no_progress)
    _print_epochs(result)
    _print_results(cfg, result)
    if baseline == "eszsl":
        _print_eszsl(ds)
    if result.final is not None:
        _save_final_model(folder, cfg, ds, result, overwrite)
        click.echo(f"\ncheckpoint: {folder}")


def _print_epochs(result: FitResult) -> None:
    """One line per validation epoch; the selected epoch is starred."""
    val = result.validation
    click.echo(f"\n{'epoch':>5} {'loss':>8} {'val U':>6} {'val S':>6} {'val H':>6} {'grid H':>6} {'samples/s':>9}")
    for r in val.history:
        mark = " *" if r.epoch == val.best_epoch else ""
        click.echo(
            f"{r.epoch:>5} {r.loss['total']:>8.3f} {100 * r.eval['U']:>6.1f} {100 * r.eval['S']:>6.1f} "
            f"{100 * r.eval['H']:>6.1f} {100 * r.grid_best['H']:>6.1f} {r.samples_per_s:>9.0f}{mark}"
        )


def _print_results(cfg: TrainConfig, result: FitResult) -> None:
    """The end table: validation at the configured and the best grid inference point, the test scored
    once with each, and the paper's protocol (selection on test) when it was run."""
    val = result.validation
    g = val.best_grid
    inf = cfg.inference
    click.echo(f"\n{'(%)':<58} {'U':>6} {'S':>6} {'H':>6} {'T':>6}")
    click.echo(
        _row(
            f"validation, epoch {val.best_epoch}, configured inference",
            val.best,
            f"lambda_rc={inf.lambda_rc} lambda_e={inf.lambda_e} c={inf.calibration}",
        )
    )
    click.echo(
        _row(
            f"validation, epoch {val.best_epoch}, best grid point",
            g,
            f"lambda_rc={g['lambda_rc']} lambda_e={g['lambda_e']} c={g['c']}",
        )
    )
    click.echo(_row("test once, configured inference", result.test))
    click.echo(_row("test once, grid point chosen on validation", result.test_grid_point))
    if result.paper_protocol is not None:
        p = result.paper_protocol
        click.echo(
            _row(
                f"paper protocol: best H/T over epochs ON TEST (epoch {int(p['epoch_H'])})",
                p,
                "selection on the test set; comparison only",
            )
        )


def _print_eszsl(ds: FeatureStore) -> None:
    """ESZSL on the same splits, its hyperparameters chosen on validation."""
    from dedn.baselines import eszsl_protocol

    e = eszsl_protocol(ds)
    click.echo(
        _row(
            "ESZSL validation (gamma, lambda, c chosen here)",
            e.val,
            f"gamma={e.gamma} lambda={e.lam} c={e.calibration}",
        )
    )
    click.echo(_row("ESZSL test once", e.test))


def _save_final_model(folder: Path, cfg: TrainConfig, ds: FeatureStore, result: FitResult, overwrite: bool) -> None:
    """The model retrained on trainval, with the figures it was selected and scored by: built in a temporary
    sibling, marked as a ``dedn train`` output, then moved to ``folder``."""
    from dedn.checkpoints import save_checkpoint
    from dedn.outputs import write_output_folder

    final = result.final
    assert final is not None
    val = result.validation
    extra = {
        "epoch": val.best_epoch,
        "validation": val.best,
        "validation_grid": val.best_grid,
        "test": result.test,
        "test_grid_point": result.test_grid_point,
        "paper_protocol": result.paper_protocol,
    }
    write_output_folder(
        folder,
        _COMMAND,
        lambda tmp: save_checkpoint(tmp, final.best_state, cfg, ds, final.partition, extra),
        overwrite=overwrite,
    )
