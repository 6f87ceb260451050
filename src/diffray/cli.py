"""`diffray` command line: init-model, data, train, tune, demo, generate, export, eval, pretrain-world, serve,
submit, config, feedback (eval and pretrain-world are in `diffray.world.command`, export in `diffray.export`,
feedback in `diffray.feedback_command`).

Every user-facing failure is a `DiffrayError`; `main()` prints it as one line on stderr and exits non-zero (2 for
config errors; 130 for Ctrl-C). The terminal shows diffray's own lines, a progress bar and the results; Ray's, Ray
Data's and DeepSpeed's output goes to log files unless `--verbose`. Heavy imports are in commands: `--help` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from diffray import logs
from diffray.errors import ConfigError, DiffrayError
from diffray.export import export_command
from diffray.console import run_with_progress
from diffray.feedback_command import export_store, feedback_app
from diffray.world.command import eval_command, pairs_command, pretrain_world_command


class CommandGroup(TyperGroup):
    def invoke(self, ctx):  # every command, sub-apps' too, runs in here; typer would exit 130 without a word
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # train and tune have said how to resume
            typer.echo("diffray: interrupted", err=True)
            sys.exit(130)


app = typer.Typer(cls=CommandGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune, search and serve Stable Diffusion adapters on a Ray cluster.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: sample set, latent cache, inspection.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect job configs.")
app.add_typer(data_app, name="data")
data_app.command("world-pairs")(pairs_command)
app.add_typer(config_app, name="config")
app.add_typer(feedback_app, name="feedback")
app.command("export")(export_command)
app.command("pretrain-world")(pretrain_world_command)
app.command("eval")(eval_command)


@app.callback()
def options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's, Ray Data's and "
                                         "DeepSpeed's own output (or set DIFFRAY_VERBOSE=1)")) -> None:
    """Fine-tune, search and serve Stable Diffusion adapters on a Ray cluster."""
    logs.configure_cli(verbose or logs.verbose())


@app.command("init-model")
def init_model(preset: str = typer.Argument(..., help="tiny (the pretrained world model) | tiny-random | sd15-shaped "
                                                      "| tiny-sdxl"),
               out_dir: Path = typer.Argument(..., help="Directory to write the diffusers pipeline to"),
               seed: int = typer.Option(0, help="Weight-init seed of a random preset (deterministic)")) -> None:
    """Write a Stable Diffusion pipeline dir (no download): the shipped pretrained world model (`tiny`) or a
    randomly initialised one (`tiny-random`, `sd15-shaped`, `tiny-sdxl`: SDXL's layout)."""
    from diffray.models.tiny import build_pipeline_dir

    path = build_pipeline_dir(out_dir, preset=preset, seed=seed)
    typer.echo(f"wrote {preset} pipeline to {path}")


@data_app.command("sample")
def data_sample(out_dir: Path = typer.Argument(..., help="Directory for the generated dataset"),
                num_images: int = typer.Option(32, min=1, help="Images in the train split"),
                resolution: int = typer.Option(64, min=8, help="Image size in pixels"),
                seed: int = typer.Option(0, help="Generator seed")) -> None:
    """Generate the procedural captioned sample dataset (imagefolder + metadata.jsonl)."""
    from diffray.data.sample import write_sample_dataset

    path = write_sample_dataset(out_dir, num_images=num_images, resolution=resolution, seed=seed)
    typer.echo(f"wrote sample dataset to {path}")


@data_app.command("world")
def data_world(out_dir: Path = typer.Argument(..., help="Directory for the dataset (a dataset diffray wrote there "
                                              "is replaced)"),
               split: str = typer.Option("pretrain", help="pretrain | heldout | base | star | cyan | striped | "
                                         "subject | all"),
               num_images: int = typer.Option(1000, min=1, help="Number of images (scenes 0..N-1)"),
               seed: int = typer.Option(0, help="World seed"),
               resolution: int = typer.Option(64, min=8, help="Image size in pixels"),
               fmt: str = typer.Option("imagefolder", "--format", help="imagefolder | parquet"),
               size_p: float = typer.Option(0.25, help="Chance a caption states the size"),
               position_p: float = typer.Option(0.25, help="Chance a caption states the position")) -> None:
    """Write a split of the shapes world (captioned, deterministic from the seed) as an imagefolder or Parquet."""
    import time

    from diffray.world.writers import write_world_dataset

    t0 = time.time()
    path = write_world_dataset(out_dir, split, num_images, seed, resolution, fmt, size_p, position_p)
    wall = time.time() - t0
    typer.echo(f"wrote {num_images} {split} images to {path} ({fmt}, {wall:.1f}s, {num_images / wall:.0f} images/s)")


@data_app.command("prepare")
def data_prepare(config: Path = typer.Argument(..., help="Job YAML (its data section and model)"),
                 overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides")) -> None:
    """Validate the job's dataset(s) and build the latent cache (VAE latents + text embeddings as Parquet)
    as a Ray Data job; training with the same settings and `data.cache` then does no encoder work."""
    from diffray.methods import load_config
    from diffray.trainers.datasets import prepare_data

    cfg = load_config(config, overrides or [])
    for name, folder in prepare_data(cfg).items():
        typer.echo(f"{name}: latent cache {folder}")


@data_app.command("condition")
def data_condition(src: str = typer.Argument(..., help="Image dataset: imagefolder, Parquet, or a URI of either"),
                   dst: str = typer.Argument(..., help="New folder for the paired dataset, or a URI (s3://...)"),
                   kind: str = typer.Option("canny", "--type", help="Preprocessor: canny | depth (| registered ones)"),
                   low_threshold: int = typer.Option(100, help="canny: lower hysteresis threshold"),
                   high_threshold: int = typer.Option(200, help="canny: upper hysteresis threshold"),
                   model_path: Optional[Path] = typer.Option(None, help="depth: local transformers "
                                                             "depth-estimation model dir"),
                   caption_column: str = typer.Option("text", help="Caption column"),
                   image_column: str = typer.Option("file_name", help="Image column"),
                   max_bad_fraction: float = typer.Option(0.05, min=0.0, max=1.0, help="Fail above this fraction "
                                                          "of bad rows")) -> None:
    """Pair every image with a control image (Ray Data job): DST gets images/, conditioning/, metadata.jsonl
    (file_name, text, conditioning_image) and quarantine.jsonl; train ControlNet on it."""
    from diffray.config import DataSection
    from diffray.data import resolve_data_path
    from diffray.data.conditioning import condition_dataset, make_preprocessor
    from diffray.cluster import connect_ray

    options = ({"low_threshold": low_threshold, "high_threshold": high_threshold} if kind == "canny"
               else {"model_path": str(model_path)} if model_path is not None else {})
    make_preprocessor(kind, **options)  # a bad type or option fails before Ray starts
    data = DataSection(path=src, caption_column=caption_column, image_column=image_column,
                       max_bad_fraction=max_bad_fraction)
    connect_ray()
    out, pairs, bad = condition_dataset(resolve_data_path(src), dst, kind, options, data)
    typer.echo(f"wrote {pairs} pairs to {out} ({bad} quarantined)")


@data_app.command("rank-pairs")
def data_rank_pairs(pairs: str = typer.Argument(..., help="Preference pairs: Parquet file or dir in Pick-a-Pic's "
                                                "columns (caption, jpg_0, jpg_1, label_0[, label_1])"),
                    reward: Path = typer.Option(..., help="Reward-model dir (a `method: reward_model` "
                                                "artifact)")) -> None:
    """The share of preference pairs a learned reward ranks the way their labels do (ties, both bad: skipped):
    the reward model's pairwise accuracy on pairs it did not train on."""
    from diffray.models.reward import rank_pairs

    r = rank_pairs(reward, pairs)
    typer.echo(f"{r['accuracy']:.1%} of {r['pairs']} pairs ranked right ({r['right']}); {r['skipped']} without a "
               "preference skipped")


@data_app.command("export-feedback")
def data_export_feedback(out: Path = typer.Argument(..., help="Parquet file to write (replaced atomically)"),
                         db: Optional[Path] = typer.Option(None, help="Feedback store (SQLite); default: "
                                                           "feedback.path of --config"),
                         config: Path = typer.Option(Path("configs/serve.yaml"), help="Serve config whose "
                                                     "feedback.path to read (when --db is not given)"),
                         image_format: str = typer.Option("jpeg", "--format", help="jpeg (Pick-a-Pic's jpg_*) or "
                                                          "png (lossless)")) -> None:
    """Write the preferences collected by POST /v1/feedback (the playground) as a Pick-a-Pic-style Parquet
    dataset: caption, jpg_0, jpg_1, label_0, label_1, plus ids, models, time and generation parameters."""
    export_store(out, db, config, image_format)


@data_app.command("inspect")
def data_inspect(path: str = typer.Argument(..., help="Imagefolder dir, Parquet file/dir, or a URI of either"),
                 out: Optional[Path] = typer.Option(Path("outputs/contact_sheet.png"), help="Contact sheet PNG"),
                 report_dir: Path = typer.Option(Path("outputs"), help="Folder for quarantine.jsonl (the "
                                                 "report training writes: one bad row per line)"),
                 sample: int = typer.Option(16, min=1, max=256, help="Images on the contact sheet"),
                 caption_column: str = typer.Option("text", help="Caption column"),
                 image_column: str = typer.Option("file_name", help="Image column"),
                 min_image_size: int = typer.Option(32, min=1, help="Validation: minimum shorter side"),
                 buckets: Optional[int] = typer.Option(None, "--buckets", min=8, metavar="RESOLUTION",
                                                      help="Also count rows per aspect bucket at this resolution"),
                 bucket_step: int = typer.Option(64, min=8, help="Bucket side granularity (with --buckets)"),
                 as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON")) -> None:
    """Counts, image-size histogram, caption lengths, what validation would quarantine, and a contact sheet."""
    import json

    from diffray.data import resolve_data_path
    from diffray.data.inspect import check_outputs, format_summary, inspect_dataset, inspect_section
    from diffray.cluster import connect_ray

    data = inspect_section(path, caption_column, image_column, min_image_size, buckets, bucket_step)
    check_outputs(out, report_dir)
    connect_ray()
    summary = inspect_dataset(resolve_data_path(path), data, out, sample, report_dir).summary()
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@app.command("train", context_settings={"allow_extra_args": False})
def train(config: Path = typer.Argument(..., help="Job YAML (see configs/)"),
          overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides")) -> None:
    """Train with Ray Train on the cluster in RAY_ADDRESS, or on a local one."""
    from diffray.methods import load_config

    cfg = load_config(config, overrides or [])
    result = run_with_progress(cfg)
    typer.echo(f"logs: {result.log_dir}")
    typer.echo(result.summary_line())


@app.command("tune")
def tune(args: list[str] = typer.Argument(..., metavar="CONFIG [key.path=value ...] | results DIR",
                                          help="A Tune job YAML (see configs/tune_lora.yaml) and overrides, or "
                                          "`results DIR` to read an experiment back")) -> None:
    """Search a training config with Ray Tune (ASHA by default); print the trial table, export the best
    trial's artifact and config. Rerunning the same experiment resumes it; `tune results DIR` re-reads it."""
    if args[0] == "results":
        if len(args) != 2:
            raise ConfigError("usage: diffray tune results DIR")
        from diffray.tune.results import format_table, read_experiment, write_report

        job, rows = read_experiment(args[1].rstrip("/"))
        typer.echo(format_table(rows, job.tune.metric))
        for what, path in write_report(rows, job, args[1].rstrip("/")).items():
            typer.echo(f"{what}: {path}")
        return
    from diffray.console import TuneProgress
    from diffray.tune.config import load_tune_job
    from diffray.tune.results import format_table
    from diffray.tune.runner import run_tune

    job = load_tune_job(args[0], args[1:])
    outcome = run_tune(job, on_trial=TuneProgress(job.tune.metric, job.tune.mode).record)
    metric = job.tune.metric
    typer.echo(format_table(outcome.rows, metric))
    done, early = sum(r.status == "completed" for r in outcome.rows), sum(r.stopped_early for r in outcome.rows)
    typer.echo(f"{len(outcome.rows)} trials ({done} completed, {early} stopped early), {outcome.concurrency} at a "
               f"time, {outcome.wall_time_s:.1f}s{' (resumed)' if outcome.restored else ''}; results: "
               f"{outcome.exp_dir}")
    if outcome.best is None:
        raise DiffrayError("no trial finished; see the failed trials' errors above, results.csv and the trials' logs")
    typer.echo(f"best: {outcome.best.trial_id} {outcome.best.params} {metric}={outcome.best.metric:.6g}\n"
               f"artifact: {outcome.best_artifact}\nconfig: {outcome.best_config}")


@app.command("submit", context_settings={"allow_interspersed_args": False})
def submit(ctx: typer.Context, args: Optional[list[str]] = typer.Argument(
               None, metavar="-- COMMAND", help="The diffray command to run on the cluster, e.g. train CONFIG"),
           address: Optional[str] = typer.Option(None, help="Job server URL (default: $RAY_API_SERVER_ADDRESS, "
                                                 "else an http(s) $RAY_ADDRESS, else http://127.0.0.1:8265: a local "
                                                 "head or `ray dashboard` tunnel)"),
           working_dir: Path = typer.Option(Path("."), help="Uploaded as the job's cwd (configs/ travel with it)"),
           env: Optional[list[str]] = typer.Option(None, "--env", help="KEY=VALUE for the job (repeatable)"),
           exclude: Optional[list[str]] = typer.Option(None, help="Extra path pattern not to upload (repeatable)"),
           storage_path: Optional[str] = typer.Option(None, envvar="DIFFRAY_STORAGE_PATH",
                                                      help="run.storage_path for a train job that does not set "
                                                      "it: the cluster's shared storage (s3://bucket/runs)"),
           follow: bool = typer.Option(True, help="Stream the job's logs and exit with its status")) -> None:
    """Run a diffray command on a running Ray cluster as a Ray job: `diffray submit -- train configs/lora.yaml`."""
    from diffray.submit import parse_env, submit_job
    job_id = submit_job(address, args or [], working_dir, parse_env(env or []), exclude or [], storage_path, follow,
                        diffray=ctx.find_root().command)  # the commands and options a job's `diffray` takes
    if not follow:
        typer.echo(job_id)  # alone on stdout: `ID=$(diffray submit --no-follow -- ...)`


@app.command("demo")
def demo(config: Path = typer.Option(Path("configs/demo.yaml"), help="The LoRA job to run"),
         out_dir: Path = typer.Option(Path("outputs"), help="Where the image grid and the eval report go"),
         suite: str = typer.Option("star", help="The eval suite scored base vs adapter after training (none: skip)"),
         num: int = typer.Option(16, min=1, help="Prompt/seed pairs of the eval"),
         overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides")) -> None:
    """Train the LoRA demo (configs/demo.yaml: the pretrained world model learns the star it never saw),
    render base-vs-adapter grids and score the reserved concept with `diffray eval`."""
    import time

    from diffray.generate import generate_grid
    from diffray.methods import load_config
    from diffray.world.evaluate import check_demo_outputs, evaluate
    from diffray.world.report import format_table

    t0 = time.time()
    cfg = load_config(config, overrides or [])
    check_demo_outputs(out_dir, suite, num)  # a refusal after the training would throw the training away
    result = run_with_progress(cfg)
    typer.echo(f"logs: {result.log_dir}")
    typer.echo(result.summary_line())
    grid = generate_grid(prompts=cfg.train.validation_prompts, adapter=result.artifact_dir, model=cfg.model.path,
                         out=out_dir / "demo_grid.png", num_images=4, steps=25, guidance=5.0, compare_base=True)
    if suite != "none":
        report = evaluate(model=cfg.model.path, suite=suite, adapter=result.artifact_dir, num=num,
                          out_dir=out_dir / "demo_eval")
        typer.echo(format_table(report))
    typer.echo(f"demo: steps={result.steps} loss first10={result.loss_first_mean:.4f} "
               f"last10={result.loss_last_mean:.4f} artifact={result.artifact_dir} grid={grid} "
               f"wall={time.time() - t0:.1f}s")


@config_app.command("show")
def config_show(config: Path = typer.Argument(..., help="Job YAML"),
                overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides")) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    import yaml

    from diffray.methods import load_config

    cfg = load_config(config, overrides or [])
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command("generate")
def generate(prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)"),
             adapter: Optional[Path] = typer.Option(None, help="Adapter dir: LoRA (pytorch_lora_weights.safetensors) "
                                                    "or Textual Inversion (learned_embeds.safetensors)"),
             model: Optional[str] = typer.Option(None, help="Base model (default: the adapter card's base)"),
             out: Path = typer.Option(Path("outputs/generated.png"), help="Output PNG (a grid)"),
             seed: int = typer.Option(0, help="Seed of the first image"),
             num_images: int = typer.Option(1, min=1, max=16, help="Images per prompt"),
             steps: int = typer.Option(20, min=1, max=500, help="Sampler steps"),
             guidance: Optional[float] = typer.Option(None, min=0.0, max=50.0, help="Guidance scale (default: the "
                                                      "model's, 7.5; 3.5 for Flux's distilled guidance)"),
             lora_scale: float = typer.Option(1.0, help="LoRA strength"),
             compare_base: bool = typer.Option(False, help="Add a row per prompt from the base model (same seeds)"),
             controlnet: Optional[list[Path]] = typer.Option(None, help="ControlNet dir (repeatable: several "
                                                             "make a MultiControlNet)"),
             control_image: Optional[list[Path]] = typer.Option(None, help="Control image, one per --controlnet"),
             control_scale: Optional[list[float]] = typer.Option(None, help="Control strength: one, or one per "
                                                                 "--controlnet (default 1.0)"),
             url: Optional[str] = typer.Option(None, help="A diffray server (http://host:8000): generate there "
                                               "(--adapter is then an adapter id) and save one PNG per image"),
             api_key: Optional[str] = typer.Option(None, envvar="DIFFRAY_API_KEY", help="Bearer key for --url"),
             size: Optional[int] = typer.Option(None, min=8, help="Width and height with --url (default: server's)"),
             timeout: Optional[float] = typer.Option(None, help="Seconds per --url attempt (default 300)")) -> None:
    """Render images with the base model, a LoRA / Textual Inversion adapter and/or ControlNets, as one grid PNG;
    with --url, on a diffray server (retries with backoff while it is busy or restarting)."""
    local_only = {"--model": model, "--compare-base": compare_base, "--controlnet": controlnet,
                  "--control-image": control_image, "--control-scale": control_scale}
    if url and any(local_only.values()):  # the server draws with its own base model and adapters
        raise ConfigError(f"{', '.join(k for k, v in local_only.items() if v)}: not with --url (the server's "
                          "own model and adapters draw; --adapter names one of its adapter ids)")
    if not url and (size is not None or timeout is not None):  # a request's options: nothing to ask locally
        raise ConfigError("--size: only with --url (a local grid is drawn at the model's own size)" if timeout is None
                          else "--timeout: only with --url (a local grid waits for no server)")
    if url:
        from diffray.serve.client import generate_remote

        paths = generate_remote(url, prompt, out, seed=seed, num_images=num_images, steps=steps, guidance=guidance,
                                adapter=adapter, lora_scale=lora_scale, size=size, api_key=api_key, timeout=timeout)
        typer.echo("wrote " + " ".join(str(p) for p in paths))
        return
    from diffray.generate import generate_grid

    path = generate_grid(prompts=prompt, adapter=str(adapter) if adapter else None, model=model, out=out,
                         seed=seed, num_images=num_images, steps=steps, guidance=guidance,
                         lora_scale=lora_scale, compare_base=compare_base,
                         controlnets=[str(c) for c in controlnet or []],
                         control_images=[str(c) for c in control_image or []], control_scales=control_scale or [])
    typer.echo(f"wrote {path}")


@app.command("serve")
def serve_app(config: Path = typer.Argument(Path("configs/serve.yaml"), help="Serve config file (configs/serve.yaml)"),
              overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides of the app's "
                                                              "args; http_options.port=8001 for the proxy")) -> None:
    """Serve the image API (Ray Serve) from a Serve config file, as `serve run` does; Ctrl-C stops it."""
    from diffray.serve.app import run_from_file

    run_from_file(str(config), overrides or [])


@app.command("publish")
def publish(artifact: str = typer.Argument(..., help="A trained artifact: runs/NAME/artifact, or its URI"),
            adapters_dir: str = typer.Argument(..., help="The serve app's adapters_dir: a folder, s3://..., gs://..."),
            adapter_id: str = typer.Argument(..., help="The id to serve it as"),
            replace: bool = typer.Option(False, help="Replace an adapter of the same id")) -> None:
    """Put an artifact into a serve registry, checked as the server checks it and never half-visible there."""
    from diffray.loop import publish_adapter

    typer.echo(f"published {adapter_id}: {publish_adapter(artifact, adapters_dir, adapter_id, replace)}")


def main() -> None:
    """Console entry point: user errors become one line and an exit code, never a traceback."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except DiffrayError as exc:
        typer.echo(f"diffray: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected failure: still one line, the traceback on request
        if os.environ.get("DIFFRAY_DEBUG"):
            raise
        typer.echo(f"diffray: internal error: {type(exc).__name__}: {exc} (set DIFFRAY_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
