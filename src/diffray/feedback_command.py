"""`diffray feedback ...`: the loop from collected preferences back to a served adapter.

- `feedback train CONFIG --publish ID`: export the store, train (Diffusion-DPO, or a reward model and then
  DDPO scored by it), publish the adapter into the serve app's registry (`diffray.loop`).
- `feedback export OUT`: the store as a Pick-a-Pic Parquet file (the same as `data export-feedback`).
- `feedback simulate --url URL --left A --right B`: the world reader as the person at the playground,
  comparing two models on a live endpoint and posting its choices (`diffray.world.judge`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

feedback_app = typer.Typer(no_args_is_help=True, help="Preferences from the playground back into a served "
                           "adapter: export, train, publish, compare.")

SERVE_CONFIG = typer.Option(Path("configs/serve.yaml"), "--serve-config", help="Serve config whose feedback.path "
                            "and adapters_dir are used (when --db / --adapters-dir are not given)")


def _serve_paths(serve_config: Path, db: Optional[Path], adapters_dir: Optional[str]) -> tuple[Path, str]:
    """(feedback store, adapter registry): the options when given, else the serve config's."""
    if db is not None and adapters_dir is not None:
        return db, adapters_dir
    from diffray.serve.config import load_serve_file

    args = load_serve_file(str(serve_config))[2]
    return db or Path(args.feedback.path), adapters_dir or args.adapters_dir


@feedback_app.command("train")
def feedback_train(
    config: Path = typer.Argument(..., help="A diffusion_dpo or reward_model job (configs/diffusion_dpo.yaml)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides of that job"),
    publish: str = typer.Option(..., "--publish", help="Adapter id to publish the result as (also the run name)"),
    then: Optional[Path] = typer.Option(None, help="After a reward_model job: the DDPO job its reward scores "
                                        "(configs/ddpo.yaml); its prompts are the feedback's"),
    then_set: Optional[list[str]] = typer.Option(None, "--then-set", help="key.path=value override of the --then "
                                                 "job (repeatable)"),
    db: Optional[Path] = typer.Option(None, help="Feedback store (SQLite); default: feedback.path of --serve-config"),
    adapters_dir: Optional[str] = typer.Option(None, help="Adapter registry to publish into (a folder or "
                                               "s3://...); default: adapters_dir of --serve-config"),
    serve_config: Path = SERVE_CONFIG,
    export: Optional[Path] = typer.Option(None, help="Where the Parquet export goes, replaced each round (default "
                                          "outputs/feedback/<id>-<hash of the export>.parquet: one file per "
                                          "feedback, so an earlier run's data stays)"),
    replace: bool = typer.Option(False, help="Replace an adapter of the same id (the server notices by content)"),
) -> None:
    """Train on the collected preferences and publish the adapter where the running server picks it up."""
    from diffray.console import run_with_progress
    from diffray.loop import run_loop

    store, registry = _serve_paths(serve_config, db, adapters_dir)
    result = run_loop(store, registry, publish, config, overrides or [], then=then, then_overrides=then_set or [],
                      replace=replace, export=export, train=run_with_progress, echo=typer.echo)
    typer.echo(f"compare it with the previous adapter: the playground at http://HOST:PORT/?left=PREVIOUS&right="
               f"{result.adapter_id} (Compare), or `diffray feedback simulate --url http://HOST:PORT --left PREVIOUS "
               f"--right {result.adapter_id}` on the tiny world")


@feedback_app.command("export")
def feedback_export(out: Path = typer.Argument(..., help="Parquet file to write (replaced atomically)"),
                    db: Optional[Path] = typer.Option(None, help="Feedback store; default: feedback.path of "
                                                      "--serve-config"),
                    serve_config: Path = SERVE_CONFIG,
                    image_format: str = typer.Option("jpeg", "--format",
                                                     help="jpeg (Pick-a-Pic's jpg_*) or png")) -> None:
    """The collected preferences as a Pick-a-Pic-style Parquet dataset (as `diffray data export-feedback`)."""
    export_store(out, db, serve_config, image_format)


def export_store(out: Path, db: Optional[Path], serve_config: Path, image_format: str) -> None:
    """Export the store `db` (default: the serve config's feedback.path) to `out` and say how many rows."""
    from diffray.errors import ConfigError
    from diffray.serve.feedback_store import export_parquet

    image_format = {"jpg": "jpeg"}.get(image_format.lower(), image_format.lower())
    if image_format not in ("jpeg", "png"):
        raise ConfigError(f"{image_format!r}: use jpeg or png", field="--format")
    if db is None:
        from diffray.serve.config import load_serve_file

        db = Path(load_serve_file(str(serve_config))[2].feedback.path)
    rows = export_parquet(db, out, image_format)
    typer.echo(f"wrote {rows} preference pairs to {out}")


@feedback_app.command("simulate")
def feedback_simulate(
    url: str = typer.Option(..., help="The diffray server (http://127.0.0.1:8000)"),
    left: str = typer.Option("base", help="Left model: an adapter id or base"),
    right: str = typer.Option(..., help="Right model: an adapter id or base"),
    num: int = typer.Option(32, min=1, max=4096, help="Prompts (one pair each)"),
    suite: str = typer.Option("prompts", help="prompts | heldout: the world suite whose prompts are drawn"),
    seed: int = typer.Option(2, help="Suite seed (diffray eval scores seed 0, world-pairs draws seed 1)"),
    steps: int = typer.Option(25, min=1, help="Sampler steps"),
    guidance: float = typer.Option(5.0, min=0.0, help="Guidance scale"),
    size: int = typer.Option(64, min=8, help="Width and height"),
    post: bool = typer.Option(True, help="Post each verdict to /v1/feedback (--no-post: only compare)"),
    workers: int = typer.Option(4, help="Pairs in flight at once"),
    api_key: Optional[str] = typer.Option(None, envvar="DIFFRAY_API_KEY", help="Bearer key"),
    timeout: float = typer.Option(300.0, help="Seconds to wait for each answer (per attempt; up to 6 attempts)"),
    as_json: bool = typer.Option(False, "--json", help="Print the tallies as JSON"),
) -> None:
    """The tiny world's reader as the person at the playground: both models draw each prompt with the same
    seed on the server, the image the reader finds right is preferred, the choice is posted as feedback."""
    from diffray.world.judge import format_tallies, judge_endpoint

    tallies = judge_endpoint(url, left, right, num=num, suite=suite, seed=seed, steps=steps, guidance=guidance,
                             size=size, api_key=api_key, post=post, workers=workers, timeout=timeout)
    typer.echo(json.dumps(tallies) if as_json else format_tallies(tallies))
