"""The feedback loop on one command (`diffray feedback train`): the preferences a served app collected
(`POST /v1/feedback`, the playground's clicks) -> a Pick-a-Pic Parquet export -> an adapter trained on them
(Diffusion-DPO, or a learned reward and then DDPO scored by it) -> published into the app's adapter registry
under a new id, which the running app serves at its next request and the playground can compare against
the previous adapter.

Publishing follows the registry's rule: the artifact is copied under a hidden name (`.<id>.publish-*`, which
the registry skips), checked as the server would check it, and renamed into place; a replaced adapter is
swapped with the new one in one step (Linux's RENAME_EXCHANGE), so a reader sees the old folder or the new
one (where the filesystem cannot swap, the old one is renamed away first: for a moment there is neither); a
replaced bare `<id>.safetensors` file is removed once the folder, which the registry serves first, is in place.
Each run is named after the adapter it publishes and the export's content (`<id>-<sha256[:8]>`): rerunning
on the same feedback resumes that run, new feedback (or a `--replace` round) trains afresh instead of
resuming an older run. The default export is named after the run too (`outputs/feedback/<run>.parquet`), so a
later round never overwrites the data an earlier run trained on, which its config and its adapter's card name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffray.errors import ConfigError, DiffrayError
from diffray.models.export_io import CARD, without_credentials

METHODS = ("diffusion_dpo", "reward_model")
PUBLISHABLE = ("lora", "textual_inversion")


@dataclass
class FeedbackSummary:
    """What an export holds: pairs, those with a preference, and their distinct prompts."""

    path: Path
    pairs: int
    preferred: int
    prompts: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.pairs} preference pairs exported to {self.path}: {self.preferred} prefer one image, "
                f"{self.pairs - self.preferred} ties or both bad (skipped)")


def summarize_export(path: Path) -> FeedbackSummary:
    """Count the pairs of an exported Parquet file that prefer one image (the trainers' rule)."""
    import pyarrow.parquet as pq

    from diffray.data.parquet import preference

    table = pq.read_table(path, columns=["caption", "label_0", "label_1"])
    captions = table.column("caption").to_pylist()
    prefs = [preference(a, b) for a, b in zip(table.column("label_0").to_pylist(), table.column("label_1").to_pylist())]
    prompts = list(dict.fromkeys(c for c, p in zip(captions, prefs) if p is not None))
    return FeedbackSummary(Path(path), len(prefs), sum(p is not None for p in prefs), prompts)


def check_new_id(adapters_dir: str | Path, adapter_id: str, replace: bool) -> None:
    """The id is a valid adapter id, not the base model's, and free unless `replace`.

    Raises:
        ConfigError: naming --publish.
    """
    from diffray import storage
    from diffray.serve.registry import valid_id
    from diffray.serve.schemas import RESERVED_IDS

    if not valid_id(adapter_id) or adapter_id.startswith("."):  # valid_id refuses RESERVED_IDS too
        raise ConfigError(f"{adapter_id!r} is not an adapter id: use 1-64 of A-Z a-z 0-9 . _ -, not starting with "
                          f"'.', none of {', '.join(sorted(RESERVED_IDS))} (they name the base model)",
                          field="publish")
    names = (adapter_id, f"{adapter_id}.safetensors")
    taken = [p for p in (storage.join(str(adapters_dir), n) for n in names) if storage.exists(p)]
    if taken and not replace:
        raise ConfigError(f"adapter {adapter_id!r} already exists ({taken[0]}): pick another id or pass --replace",
                          field="publish")


def publish_adapter(artifact: str, adapters_dir: str | Path, adapter_id: str, replace: bool = False,
                    card_extra: dict[str, Any] | None = None) -> str:
    """Copy the artifact folder `artifact` (a local path or URI) into the registry `adapters_dir` (a folder or
    an object-storage URI) as `adapter_id`; `card_extra` is merged into its diffray_card.json. Returns where
    it went. In a folder the copy is renamed into place; on object storage it is uploaded aside first and then
    copied into place, its manifest last (`storage.copy_dir`): a registry never serves half of it, and a failed
    upload leaves a replaced adapter whole.

    Raises:
        ConfigError: a bad or taken id.
        DiffrayError: the artifact is not one the server can serve (the registry's reason), or unreadable.
    """
    import tempfile

    import pyarrow as pa
    import pyarrow.fs as pafs

    from diffray import storage
    from diffray.serve.registry import AdapterRegistry

    remote = storage.is_uri(adapters_dir)
    root = str(adapters_dir) if remote else Path(adapters_dir).expanduser().resolve()
    try:
        check_new_id(root, adapter_id, replace)
        if not remote:
            root.mkdir(parents=True, exist_ok=True)
    except (OSError, pa.ArrowException) as exc:  # an endpoint that cannot be reached, a file in the way
        why = str(exc).strip().replace("\n", "\\n")
        raise DiffrayError(f"cannot publish {artifact} to {root}: {why}") from None
    staging = Path(tempfile.mkdtemp(prefix="diffray-publish-")) if remote else root
    tmp = staging / f".{adapter_id}.publish-{uuid.uuid4().hex[:8]}"
    try:
        fs, src = storage.resolve(artifact)
        if (kind := fs.get_file_info(src).type) != pafs.FileType.Directory:
            what = "a file" if kind == pafs.FileType.File else "no such folder"
            raise DiffrayError(f"{artifact}: {what}; publish takes an artifact folder (runs/NAME/artifact)")
        storage.copy_dir(fs, src, str(tmp))  # a few files at a time; returns once no write is running
        (tmp / storage.MANIFEST).unlink(missing_ok=True)  # an object-storage artifact's: a new one is written
        _publish_card(tmp / CARD, card_extra)
        info = AdapterRegistry(staging).inspect(tmp.name)
        if info is None or info.problem or info.kind not in PUBLISHABLE:
            why = info.problem if info is not None and info.problem else f"kind {getattr(info, 'kind', 'none')}"
            raise DiffrayError(f"{artifact}: the server cannot serve this artifact ({why})")
        if remote:
            return _upload(tmp, root, adapter_id, replace)
        final = root / adapter_id
        check_new_id(root, adapter_id, replace)  # taken since the first check (folder or file): refuse unless replacing
        # one step: a reader never finds the id missing; tmp then holds the old folder (removed below)
        if not (final.exists() and _exchange(tmp, final)):
            old = root / f".{adapter_id}.old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        if replace:  # the folder is in place and wins over a bare file: removing it leaves no gap
            _remove_bare_file(root, adapter_id)
        return str(final)
    except (OSError, pa.ArrowException) as exc:
        why = str(exc).strip().replace("\n", "\\n")  # one line: a key or an AWS message can hold newlines
        raise DiffrayError(f"cannot publish {artifact} to {root}: {why}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


def _remove_bare_file(root: Path, adapter_id: str) -> None:
    """Remove the replaced `<id>.safetensors` LoRA file beside the newly published `<id>/` folder. The registry
    serves the folder when both exist, but the old file would be served as `<id>` again once the folder is
    removed, and anyone reading the registry by hand sees two artifacts for one id: a replaced adapter leaves
    nothing behind (as `_upload` does on object storage). A link is removed, never its target.

    Raises:
        DiffrayError: the file cannot be removed (the folder is published and served).
    """
    bare = root / f"{adapter_id}.safetensors"
    try:
        if bare.is_symlink() or bare.is_file():
            bare.unlink()
    except OSError as exc:
        raise DiffrayError(f"published {root / adapter_id}, but the replaced {bare} cannot be removed ({exc}): "
                           "remove it by hand") from None


def _publish_card(path: Path, extra: dict[str, Any] | None) -> None:
    """The card of an adapter being published, with `extra` merged in and no credentials (a card written before
    cards were kept free of them may hold some). One that is not a JSON object is left for the registry's check
    to name."""
    try:
        card = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(card, dict):
        return
    clean = without_credentials(json.loads(json.dumps({**card, **(extra or {})}, default=str)))
    if clean != card:  # else the card goes out byte for byte
        path.write_text(json.dumps(clean, indent=2))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or
    filesystem cannot, and then nothing moved."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _upload(folder: Path, root: str, adapter_id: str, replace: bool) -> str:
    """Upload a checked artifact to `root/adapter_id` on object storage. `storage.copy_dir` uploads the files
    aside first, so an upload that fails leaves a replaced adapter whole, then puts them in place and removes
    the replaced adapter's other files. A replaced bare `<id>.safetensors` goes once the folder, which the
    registry serves first, is whole.

    Raises:
        DiffrayError: the bare file cannot be removed (the folder is published and served).
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    from diffray import storage

    dest = storage.join(root, adapter_id)
    if storage.exists(dest) or storage.exists(f"{dest}.safetensors"):
        check_new_id(root, adapter_id, replace)  # taken since the first check: refuse unless replacing
    storage.copy_dir(pafs.LocalFileSystem(), str(folder), dest)
    fs, bare = storage.resolve(f"{dest}.safetensors")
    try:
        if fs.get_file_info(bare).type == pafs.FileType.File:
            fs.delete_file(bare)
    except (OSError, pa.ArrowException) as exc:
        raise DiffrayError(f"published {dest}, but the replaced {dest}.safetensors cannot be removed ({exc}): "
                           "remove it by hand") from None
    return dest


def export_round(db: Path, adapter_id: str, export: Path | None = None) -> tuple[Path, str]:
    """Export the store `db` (PNG: the trainers read pixels) for one round; its run is `<id>-<sha256[:8] of the
    export>`: the same feedback resumes that run, new feedback trains afresh. Returns (export, run name).

    Without `export` the file is `outputs/feedback/<run name>.parquet`, written aside and renamed into place:
    one file per content, so a later round (new feedback, a `--replace`) never overwrites the data an earlier
    run trained on, and a rerun on the same feedback rewrites the same bytes its resumed run reads. A given
    `export` is written there, replacing what it held (never the store itself: `export_parquet` refuses it).

    Raises:
        DiffrayError: no store at `db`, or the export cannot be written.
    """
    from diffray.serve.artifacts import sha256_file
    from diffray.serve.feedback_store import export_parquet

    folder = (Path("outputs") / "feedback").absolute()
    out = Path(export).absolute() if export else folder / f".{adapter_id}.export-{uuid.uuid4().hex[:8]}.parquet"
    try:
        export_parquet(db, out, "png")
        run_name = f"{adapter_id}-{sha256_file(out)[:8]}"
        if export is None:
            os.replace(out, folder / f"{run_name}.parquet")
            out = folder / f"{run_name}.parquet"
    except OSError as exc:
        raise DiffrayError(f"cannot export {db} to {out}: {exc}") from None
    finally:
        if export is None and out.name.startswith("."):
            out.unlink(missing_ok=True)  # a failed round leaves no hidden export behind
    return out, run_name


@dataclass
class LoopResult:
    summary: FeedbackSummary
    runs: list = field(default_factory=list)  # RunResult of each training, in order
    adapter_id: str = ""
    adapter_dir: str | None = None


def plan_configs(config: Path, overrides: list[str], then: Path | None, then_overrides: list[str],
                 export: Path, run_name: str, reward_path: str = "reward-model-artifact"):
    """The job config(s) the loop trains: (first, the DDPO job scored by `reward_path` or None). Runs are
    named `run_name` (or `<run_name>-reward` and `<run_name>`) unless overridden; data.path is the export.

    Raises:
        ConfigError: a method the loop does not train, a reward model without a DDPO job (or the reverse), an
            override the loop would drop (data.path, --then-set without --then).
    """
    from diffray.methods import load_config

    if any(o.partition("=")[0].strip() == "data.path" for o in overrides):
        raise ConfigError("the loop trains on the feedback export; choose where it goes with --export",
                          field="data.path")
    if then is None and then_overrides:
        raise ConfigError(f"{then_overrides[0]!r} overrides the --then job, and there is none", field="then-set")
    method = load_config(config, overrides).method
    if method not in METHODS:
        raise ConfigError(f"{config}: method {method!r}; feedback trains {' or '.join(METHODS)}", field="method")
    if method == "reward_model" and then is None:
        raise ConfigError("a reward_model job needs --then CONFIG: the DDPO job its reward scores", field="then")
    if method == "diffusion_dpo" and then is not None:
        raise ConfigError("--then is for a reward_model job; a diffusion_dpo job publishes its own LoRA", field="then")
    name = run_name if then is None else f"{run_name}-reward"
    first = load_config(config, [f"run.name={name}", *overrides, f"data.path={export}"])
    if then is None:
        return first, None
    then_method = load_config(then, then_overrides).method
    if then_method != "ddpo":
        raise ConfigError(f"{then}: method {then_method!r}; --then takes a ddpo job", field="then")
    reward = ["ddpo.reward.name=learned", "ddpo.reward.options=" + json.dumps({"path": reward_path})]
    return first, load_config(then, [f"run.name={run_name}", *then_overrides, *reward])


def run_loop(db: Path, adapters_dir: str | Path, adapter_id: str, config: Path, overrides: list[str],
             then: Path | None = None, then_overrides: list[str] | None = None, replace: bool = False,
             export: Path | None = None, train=None, echo=print) -> LoopResult:
    """Export the store `db`, train on it (and DDPO after a reward model), publish the adapter.
    `train(cfg)` runs one job and returns its RunResult (default: `run_training`)."""
    from diffray import storage

    if train is None:
        from diffray.trainers.runner import run_training as train
    adapters_dir = str(adapters_dir) if storage.is_uri(adapters_dir) else Path(adapters_dir).expanduser()
    check_new_id(adapters_dir, adapter_id, replace)
    if not adapter_id[0].isalnum():  # the runs are named after it, and a run name starts with a letter or digit
        raise ConfigError(f"{adapter_id!r}: the loop names its training run after the id, so start it with a "
                          "letter or digit", field="publish")
    # the plans' refusals come before anything is exported (the default export is named after its content)
    plan_configs(config, overrides, then, then_overrides or [], Path(export or "feedback.parquet"), adapter_id)
    given = export
    export, run_name = export_round(db, adapter_id, export)
    summary = summarize_export(export)
    echo(summary.line())
    if summary.preferred == 0:
        if given is None:  # the round's own file: nothing will train on it
            export.unlink(missing_ok=True)
        raise DiffrayError(f"{db}: no pair prefers one image ({summary.pairs} ties or both bad): collect more "
                           "feedback before training")
    extra = list(then_overrides or [])
    if then is not None:
        prompts = export.with_suffix(".prompts.txt")
        # one prompt a line, as the reader splits them (str.splitlines: also \r, U+2028, ...)
        prompts.write_text("\n".join(" ".join(p.splitlines()) for p in summary.prompts) + "\n")
        extra.append(f"ddpo.prompts_file={prompts}")
    first, _ = plan_configs(config, overrides, then, extra, export, run_name)
    result = LoopResult(summary, adapter_id=adapter_id)
    result.runs.append(train(first))
    echo(f"{first.method}: {result.runs[-1].summary_line()}")
    if then is not None:
        _, second = plan_configs(config, overrides, then, extra, export, run_name, result.runs[-1].artifact_dir)
        result.runs.append(train(second))
        echo(f"ddpo: {result.runs[-1].summary_line()}")
    provenance = {"feedback": {"store": str(Path(db).absolute()), "export": str(export), "pairs": summary.pairs,
                               "preferred": summary.preferred},
                  "trained_by": [r.run_dir for r in result.runs]}
    result.adapter_dir = publish_adapter(result.runs[-1].artifact_dir, adapters_dir, adapter_id, replace, provenance)
    echo(f"published {adapter_id}: {result.adapter_dir}")
    return result
