"""``d2ora simulate`` and ``d2ora compare``: thin layers over d2ora.recipes.simulate / .compare."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from d2ora.commands._errors import USER_ERRORS, fail
from d2ora.config_io import ConfigError, load_config, to_yaml

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file of SimulateConfig sections (see configs/simulate_default.yaml).", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value (YAML value), e.g. network.mixer=dimat. Repeatable.", show_default=False),
]
OutputOption = Annotated[Path | None, typer.Option("--output-dir", "-o", help="Report folder.", show_default=False)]
ResumeOption = Annotated[
    Path | None,
    typer.Option("--resume", help="Continue the run in this folder from its newest complete checkpoint (its config.yaml; --set may change only keys that cannot change results).", show_default=False),
]

PrintConfigOption = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved config (defaults, --config, --set) as YAML and exit.")
]


def console_for_logs() -> Console:
    """Rich's 80 columns for piped output squeeze the results tables unreadably: logs get 160. Output
    to a file or pipe is flushed line by line: Python buffers it in blocks otherwise, and a log
    (``d2ora peer ... > org.log``, a service's journal) would show a round's line only at exit."""
    console = Console()
    if not console.is_terminal:
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        console = Console(width=160)
    return console


def user_errors() -> tuple[type[Exception], ...]:
    from d2ora.data.partition import PartitionError
    from d2ora.distributed.exchange import PeerSilentError
    from d2ora.distributed.group import DistributedSetupError, ProcessLostError
    from d2ora.distributed.wire import WireError
    from d2ora.engine.checkpoint import CheckpointError
    from d2ora.engine.round import DivergedError
    from d2ora.topology import TopologyError
    from d2ora.trust.identity import IdentityError
    from d2ora.trust.ledger import LedgerError

    return (*USER_ERRORS, PartitionError, TopologyError, DivergedError, CheckpointError, PeerSilentError,
            DistributedSetupError, ProcessLostError, WireError, IdentityError, LedgerError)


def load_run_config(config: Path | None, set_: list[str] | None, updates: dict[str, Any], resume: Path | None) -> Any:
    """The run's config: from --config (or the defaults) with --set; for --resume, the run folder's own config.yaml."""
    from d2ora.recipes.simulate import CONFIG_FILE
    from d2ora.recipes.simulate_config import SimulateConfig

    if resume is not None:
        if config is not None:
            raise ConfigError("--resume reads the run folder's config.yaml; do not pass --config too")
        saved = Path(resume) / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"nothing to resume in {resume}: it has no {CONFIG_FILE}")
        config, updates = saved, {**updates, "run.output_dir": str(resume)}
    return load_config(SimulateConfig, config, set_ or [], updates=updates)


def simulate(
    config: ConfigOption = None,
    set_: SetOption = None,
    mixer: Annotated[str | None, typer.Option("--mixer", help="local, d2ora, decaf, dora_exact, dimat, fedavg, fedavg_products, fedavg_exact or centralized.", show_default=False)] = None,
    output_dir: OutputOption = None,
    resume: ResumeOption = None,
    print_config: PrintConfigOption = False,
) -> None:
    """Simulate P peers fine-tuning one model with DoRA and gossiping adapters.

    With no arguments: MiniLM on BBC News, 8 peers on a ring, Dirichlet alpha=0.5, DoRA r=8, mixer decaf (offline).
    """
    from d2ora.recipes.simulate import simulate as run_simulate

    updates: dict[str, Any] = {}
    if mixer is not None:
        updates["network.mixer"] = mixer
    if output_dir is not None:
        updates["run.output_dir"] = str(output_dir)
    try:
        resolved = load_run_config(config, set_, updates, resume)
        if print_config:
            typer.echo(to_yaml(resolved), nl=False)
            return
        run_simulate(resolved, console=console_for_logs(), resume=resume is not None)
    except user_errors() as exc:
        raise fail(str(exc)) from None


def compare(
    mixers: Annotated[str, typer.Option("--mixers", "-m", help="Comma-separated mixers (and 'centralized') to run on the same partition and seeds.")] = "local,d2ora,decaf,dimat,fedavg,centralized",
    config: ConfigOption = None,
    set_: SetOption = None,
    output_dir: OutputOption = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds, e.g. 0,1,2: every mixer runs once per seed (into <mixer>/seed-<s>/) and the tables show mean ± sample std. Default: the config's seed.", show_default=False)] = None,
    skip_done: Annotated[bool, typer.Option("--skip-done/--no-skip-done", help="Skip a (mixer, seed) whose folder holds a finished run of the same config, resume an unfinished one; --no-skip-done reruns all.")] = True,
) -> None:
    """Run several mixers (over one or more seeds) with everything else equal and print one table.

    The report goes to --output-dir, else the config's run.output_dir (runs/compare by default).
    """
    from d2ora.recipes.compare import compare as run_compare
    from d2ora.recipes.compare import parse_mixers, parse_seeds

    updates: dict[str, Any] = {} if output_dir is None else {"run.output_dir": str(output_dir)}
    try:
        names = parse_mixers(mixers)
        seed_list = None if seeds is None else parse_seeds(seeds)
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        cfg = load_run_config(config, set_, updates, None)
        if output_dir is None and cfg.run.output_dir == Path("runs/simulate"):  # the simulate default: give compare its own
            cfg = cfg.updated({"run.output_dir": Path("runs/compare")})
        run_compare(cfg, names, console=console_for_logs(), seeds=seed_list, skip_done=skip_done)
    except user_errors() as exc:
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("compare")(compare)
