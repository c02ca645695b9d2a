"""The ``saepipe`` command: run the pipeline or one stage, and describe the setup.

    saepipe repro [DVC_ARGS]...          reproduce the pipeline, then print the headline metrics
    saepipe run STAGE [DVC_ARGS]...      reproduce one stage and what it needs
    saepipe info                         versions, platform, BLAS, training kernels, params file
    saepipe params [SECTION]             the params the stages see (params.yaml over the defaults)
    saepipe export --format saelens --out DIR [--sae FILE]   an SAE in another library's format
    saepipe steer -f N -s S PROMPT       continue PROMPT clean and with SAE feature N steered, side by side

The stages themselves stay ``python -m stages.<name>`` entry points that DVC calls (``dvc.yaml``);
this command drives DVC in the project folder (the nearest folder above the current one that has
a ``dvc.yaml``), so it works from any subfolder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
import yaml

from saepipe.activations.config import ExtractConfig, NormalizeConfig
from saepipe.analysis.config import AnalysisConfig
from saepipe.evaluation.config import EvaluateConfig
from saepipe.evaluation.summary import results_lines
from saepipe.runtime import blas
from saepipe.runtime.params import DEFAULT_PARAMS_FILE, ParamsSection, model_spec, read_params
from saepipe.runtime.version import __version__
from saepipe.sae.config import SAEConfig, SweepConfig
from saepipe.texts.config import PrepareConfig

SECTIONS: dict[str, type[ParamsSection]] = {
    "sweep": SweepConfig,
    "prepare": PrepareConfig,
    "extract": ExtractConfig,
    "normalize": NormalizeConfig,
    "sae": SAEConfig,
    "evaluate": EvaluateConfig,
    "analyze": AnalysisConfig,
}
"""Each params.yaml section and the config class that reads it (the stages read them the same way)."""

VERSIONED = ("mlx", "mlx-lm", "numpy", "numba", "dvc", "pyarrow", "transformers")
"""Distributions whose versions ``saepipe info`` reports."""

PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": False, "help_option_names": ["-h", "--help"]}


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the current one) holding a ``dvc.yaml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise click.ClickException(f"no dvc.yaml in {here} or above: run saepipe inside a saepipe project")


def _dvc(args: list[str], root: Path) -> int:
    """Run ``dvc <args>`` with this interpreter's DVC in ``root``; its exit status."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root).returncode


def _stage_names(root: Path) -> list[str]:
    return list((yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="saepipe")
def main() -> None:
    """Train and study TopK sparse autoencoders on language-model activations (MLX + DVC).

    The pipeline (prepare -> extract -> normalize -> train -> evaluate -> analyze -> dashboard,
    then summary) is a DVC pipeline in dvc.yaml, configured by params.yaml; its sweep: section
    says which sites and SAE variants are trained (one train@<site>-<variant> per pair). A stage
    reruns only when its code, params or inputs change. Run these inside the project folder (or
    any folder below it).
    """


@main.command(context_settings=PASS_THROUGH, short_help="Reproduce the pipeline, then print the headline metrics.")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def repro(dvc_args: tuple[str, ...]) -> None:
    """Reproduce the whole pipeline, then print the results: the headline metrics of a one-run
    sweep, or the summary table of every run.

    DVC_ARGS go to `dvc repro` as they are, e.g. `saepipe repro --force` or `saepipe repro --dry`.
    To change a setting for one experiment use `dvc exp run -S sae.k=64`.
    """
    root = project_root()
    status = _dvc(["repro", *dvc_args], root)
    if status != 0:
        raise SystemExit(status)
    for line in _results(root):
        click.echo(line)


def _results(root: Path) -> list[str]:
    """The results lines of the project's sweep; none when the pipeline has not produced them (e.g.
    after ``--dry``)."""
    try:
        sweep = SweepConfig.from_dict(read_params(root / DEFAULT_PARAMS_FILE).get("sweep") or {})
        return results_lines(sweep.runs(), root)
    except FileNotFoundError:
        return []


@main.command(context_settings=PASS_THROUGH, short_help="Reproduce one stage and the stages it needs.")
@click.argument("stage")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def run(stage: str, dvc_args: tuple[str, ...]) -> None:
    """Reproduce STAGE and the stages it needs (those whose outputs it reads), nothing after it.

    STAGE is one of dvc.yaml's stages (prepare, extract, normalize, train, evaluate, analyze,
    dashboard, summary): a matrix stage by its name runs for every site/variant, or one of them
    by DVC's name, e.g. `train@6.mlp-default` (`dvc stage list` lists them). DVC_ARGS go to
    `dvc repro STAGE` as they are, e.g. `saepipe run train --dry` (show what would run) or
    `saepipe run train --single-item` (STAGE only, even if a stage before it is out of date).
    """
    root = project_root()
    names = _stage_names(root)
    if stage.partition("@")[0] not in names:
        raise click.BadParameter(f"{stage!r} is not a stage of dvc.yaml; choose from {', '.join(names)}",
                                 param_hint="STAGE")
    status = _dvc(["repro", stage, *dvc_args], root)
    if status != 0:
        raise SystemExit(status)


@main.command(short_help="Versions, platform, BLAS, training kernels, params file.")
def info() -> None:
    """Versions, platform, the BLAS MLX runs on, the training kernels and the params file."""
    import mlx.core as mx  # lazy: only this command needs MLX (keeps --help and params instant)

    from saepipe.training.steps import resolve_kernels  # lazy: loads numba

    click.echo(f"saepipe {__version__} (python {platform.python_version()}, {sys.executable})")
    click.echo(f"platform: {platform.platform()} ({platform.machine()}, {os.cpu_count()} CPUs)")
    for dist in VERSIONED:
        click.echo(f"  {dist:<13} {_version(dist)}")
    click.echo(f"MLX device: {mx.default_device()}")
    click.echo(f"BLAS: {_blas_line()}")
    click.echo(f"training kernels: auto -> {resolve_kernels('auto')}")
    try:
        params_file = project_root() / DEFAULT_PARAMS_FILE
        click.echo(f"params: {params_file}" + ("" if params_file.is_file() else " (missing)"))
    except click.ClickException:
        click.echo("params: not inside a saepipe project (no dvc.yaml above the current folder)")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _blas_line() -> str:
    """Which BLAS MLX's matmuls use, each candidate's verdict on this CPU, and how to change it."""
    if not sys.platform.startswith("linux"):
        return "the platform's (Accelerate / Metal on macOS)"
    if os.environ.get(blas.ENV_VAR) == "0":
        return f"MLX's bundled reference BLAS ({blas.ENV_VAR}=0)"
    if blas.loaded_path:
        line = f"{blas.loaded_path} (set {blas.ENV_VAR}=/path/to/libopenblas.so to pick another)"
    else:
        line = "MLX's bundled reference BLAS (slow: see the README, \"Fast MLX on Linux\")"
    selection = blas.selection
    for candidate, verdict in (selection.report if selection else []):
        state = "passed the probe" if verdict.ok else f"rejected: {verdict.reason}"
        if candidate.path in selection.gflops:
            state += f", sgemm {selection.gflops[candidate.path]:.1f} GFLOP/s in the race"
        line += f"\n  candidate {candidate.name}: {state}"
    return line + f"\n  verdicts cached in {blas.cache_dir() / blas.VERDICTS_FILE}"


@main.command(short_help="Print the params the stages see (params.yaml + defaults).")
@click.argument("section", required=False, type=click.Choice(["model", *SECTIONS]))
@click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="params file (default: params.yaml of the project)")
def params(section: str | None, params_path: Path | None) -> None:
    """Print the params the stages see: params.yaml over the defaults (YAML).

    Every key is shown, with its default when params.yaml leaves it out; an unknown key is an error
    (as in the stages). SECTION limits the output to one section.
    """
    path = params_path or project_root() / DEFAULT_PARAMS_FILE
    try:
        effective = effective_params(read_params(path))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    shown = effective if section is None else {section: effective[section]}
    click.echo(f"# {path}" + ("" if section is None else f" ({section})"))
    click.echo(yaml.safe_dump(shown, sort_keys=False, default_flow_style=None).rstrip())


@main.command(short_help="Write an SAE in another library's format (SAELens).")
@click.option("--format", "fmt", type=click.Choice(["saelens"]), default="saelens", show_default=True,
              help="target format")
@click.option("--sae", "sae_path", default="data/train/6.mlp/default/sae.safetensors", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="saepipe SAE file (a relative path that is not in the current folder is read from the project)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder to write (cfg.json + sae_weights.safetensors)")
@click.option("--model-name", default=None, help="metadata.model_name (default: the model the SAE was trained on)")
@click.option("--dataset-path", default=None, help="metadata.dataset_path (e.g. a Hugging Face dataset id)")
@click.option("--hook-name", default=None, help="metadata.hook_name (default: mapped from the SAE's site)")
def export(fmt: str, sae_path: Path, out_dir: Path, model_name: str | None, dataset_path: str | None,
           hook_name: str | None) -> None:
    """Export an SAE so another library loads it: `--format saelens` writes SAELens's layout
    (cfg.json + sae_weights.safetensors; load with `SAE.load_from_disk(DIR)`), the input
    normalization folded into the weights and the site mapped to a TransformerLens hook name
    (layer L's mlp -> blocks.L.hook_mlp_out, attn -> hook_attn_out, output -> hook_resid_post)."""
    from saepipe.sae.export import export_saelens  # lazy: loads MLX (keeps --help instant)
    from saepipe.sae.topk import TopKSAE  # lazy: as above

    if not sae_path.is_absolute() and not sae_path.exists():
        with contextlib.suppress(click.ClickException):  # outside a project: keep the path as given
            sae_path = project_root() / sae_path
    overrides = {k: v for k, v in (("model_name", model_name), ("dataset_path", dataset_path),
                                   ("hook_name", hook_name)) if v is not None}
    try:
        sae = TopKSAE.load(sae_path)
        out = export_saelens(sae, out_dir, **overrides)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    cfg = json.loads((out / "cfg.json").read_text())
    click.echo(f"{out}: SAELens {cfg['architecture']} SAE, d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, "
               f"k {cfg['k']}, hook {cfg['metadata']['hook_name']} (from {sae_path})")


DEFAULT_SAE = Path("data/train/sae.safetensors")
"""The train stage's SAE, relative to the project folder: what ``saepipe steer`` steers by default."""


@main.command(short_help="Generate with and without a feature steered, side by side.")
@click.argument("prompt")
@click.option("--feature", "-f", type=int, required=True, help="index of the SAE feature (latent) to steer with")
@click.option("--strength", "-s", type=float, required=True,
              help="how many units of the feature to add (its decoder direction, in the model's activation space)")
@click.option("--sae", "sae_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"SAE file (default: {DEFAULT_SAE} of the project)")
@click.option("--model", "model_name", default=None,
              help="model to load (default: the one the SAE was trained on, else params.yaml's model)")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=40, show_default=True,
              help="tokens to generate")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0: sampling")
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed (with --temperature)")
@click.option("--width", type=click.IntRange(min=40), default=None, help="output width (default: the terminal's)")
def steer(prompt: str, feature: int, strength: float, sae_path: Path | None, model_name: str | None,
          max_tokens: int, temperature: float, seed: int, width: int | None) -> None:
    """Continue PROMPT twice, clean and with SAE feature --feature added at --strength on every
    token, and print both continuations side by side.

    The SAE (the train stage's by default) is checked against the model: same weights, its recorded
    layer and component.

    \b
    saepipe steer --feature 1234 --strength 8 "The weather today is"
    saepipe steer -f 1234 -s -4 --sae my_sae.mlx --model default --max-tokens 60 "Once upon a time"
    """
    from saepipe.analysis.steering import Steer, generate  # lazy: loads MLX and the model code
    from saepipe.lm.model import load_model  # lazy: loads MLX, mlx-lm and transformers
    from saepipe.sae.topk import load_sae  # lazy: loads MLX

    path = _sae_file(sae_path)
    try:
        sae = load_sae(path)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    spec = model_name or steer_model_spec(sae.metadata)
    try:
        loaded = load_model(spec)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(f"{err} (pass --model)") from err
    steering = Steer(sae, feature, strength)
    options = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        steered = generate(loaded, prompt, [steering], **options)
    except (ValueError, TypeError) as err:  # IncompatibleSAEError is a ValueError
        raise click.ClickException(str(err)) from err
    clean = generate(loaded, prompt, [], **options)
    meta = sae.metadata
    click.echo(f"model {loaded.info.model_id}; SAE {path} ({meta.get('site', 'site not recorded')}, "
               f"{sae.d_hidden} features)")
    mode = "greedy" if temperature == 0 else f"temperature {temperature:g}, seed {seed}"
    click.echo(f"prompt {prompt!r}; {mode}, up to {max_tokens} tokens "
               f"({steered.tokens_per_second:.0f} tok/s{', KV cache' if steered.cached else ''})")
    click.echo("")
    for line in side_by_side(clean.text, steered.text, "clean", f"steered: feature {feature} x {strength:g}",
                             width or shutil.get_terminal_size((100, 24)).columns):
        click.echo(line)


def _sae_file(path: Path | None) -> Path:
    """The SAE file: as given (a relative path that is not in the current folder is read from the
    project, as ``export`` does), else the project's train output."""
    path = DEFAULT_SAE if path is None else path
    if not path.is_absolute() and not path.exists():
        with contextlib.suppress(click.ClickException):  # outside a project: keep the path as given
            path = project_root() / path
    return path


def steer_model_spec(sae_metadata: dict[str, Any]) -> str:
    """The model ``saepipe steer`` loads for an SAE: the one its metadata names ("default" for the
    shipped GGUF), else params.yaml's ``model`` (in a project), else "default"."""
    from saepipe.lm.model import DEFAULT_GGUF  # lazy: loads mlx-lm

    name = sae_metadata.get("model_name")
    if name == DEFAULT_GGUF:
        return "default"
    if name and (Path(name).expanduser().exists() or (name.count("/") == 1 and not name.startswith((".", "/")))):
        return str(name)
    try:
        return model_spec(read_params(project_root() / DEFAULT_PARAMS_FILE))
    except (click.ClickException, FileNotFoundError):
        return "default"


def side_by_side(left: str, right: str, left_title: str, right_title: str, width: int) -> list[str]:
    """Two texts in two wrapped columns under their titles, for a terminal ``width`` wide."""
    col = max(10, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.split("\n"):
            lines.extend(textwrap.wrap(paragraph, col, replace_whitespace=True, drop_whitespace=False) or [""])
        return lines

    a, b = wrap(left), wrap(right)
    rows = [f"{left_title[:col]:<{col}} | {right_title[:col]}", f"{'-' * col}-+-{'-' * col}"]
    for x, y in itertools.zip_longest(a, b, fillvalue=""):
        rows.append(f"{x:<{col}} | {y}".rstrip())
    return rows


def effective_params(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a params file) with every section completed by its config's defaults and checked."""
    out: dict[str, Any] = {"model": model_spec(raw)}
    for name, config in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"params section `{name}:` must be a mapping, got {type(values).__name__}")
        out[name] = config.from_dict(values).to_dict()
    return out


__all__ = ["DEFAULT_SAE", "SECTIONS", "effective_params", "main", "project_root", "side_by_side",
           "steer_model_spec"]
