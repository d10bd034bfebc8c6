"""`sdbuild`: build, plan and explain recipes; release and reproduce archives; verify and clean the cache.

Expected mistakes (bad recipes, missing prerequisites, failing stages) print one clear block and
exit non-zero; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from builder.engine import Engine, Event, Graph, Heartbeat, StageFinished, StageResult, StageStarted, WorkersReady
from builder.engine.events import RemoteWarning, Transfer
from builder.errors import EnvironmentFault, StageFailed, UserError
from builder.faults import as_fault, free_bytes, size_text
from builder.generate.request import REFINER_START
from builder.recipe import LoadedRecipe, load_recipe, load_recipes, recipe_json_schema
from builder.sd.settings import ANALYSED_COMPONENTS

if TYPE_CHECKING:
    from builder.remote.cache import RemoteCache
    from builder.remote.dask_executor import DaskExecutor

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Workspace:
    """Where recipes are read from and everything a build writes goes: artifacts and the cache."""

    def __init__(self, root: Path, cache_dir: Path | None, remote: str | None = None, *, remote_from_env: bool = True):
        self.root = root.resolve()
        env_cache = os.environ.get("SDBUILD_CACHE_DIR")
        self.cache = (cache_dir or (Path(env_cache) if env_cache else self.root / ".sdbuild-cache")).absolute()
        self.artifacts = self.root / "artifacts"
        # `--remote`, else SDBUILD_REMOTE (unless remote_from_env is False): read when a command needs it.
        self.remote_arg = remote
        self.remote_from_env = remote_from_env

    def load(self, recipe: str) -> LoadedRecipe:
        return load_recipe(Path(recipe), workspace=self.root)

    def remote_url(self) -> str | None:
        from builder.remote.url import remote_url

        if self.remote_arg is None and not self.remote_from_env:
            return None
        return remote_url(self.remote_arg)

    def remote(self) -> RemoteCache | None:
        from builder.remote.cache import RemoteCache

        url = self.remote_url()
        return RemoteCache(url) if url is not None else None

    def engine(self, loaded: LoadedRecipe) -> Engine:
        return self.engine_for(loaded.target)

    def engine_for(self, target: str) -> Engine:
        """The engine over this workspace's cache (and remote cache, if any), keeping its index under `target`."""
        return Engine(self.cache, target=target, inputs_root=self.root, remote=self.remote())


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"


class Progress:
    """Rich progress: a line per finished stage (hit or built, time, peak memory) and a live table
    of running stages with their elapsed time and current memory."""

    def __init__(self, console: Console):
        self.console = console
        self.running: dict[str, tuple[str, float, int | None]] = {}
        self.transfers: dict[str, Transfer] = {}
        self.live = Live(self._table(), console=console, transient=True, refresh_per_second=4)

    def _table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        for stage_id, (reason, elapsed, rss) in self.running.items():
            table.add_row("[yellow]running", stage_id, f"{elapsed:6.1f} s", _gib(rss), f"[dim]{reason}")
        for stage_id, transfer in self.transfers.items():
            share = transfer.done_bytes / transfer.total_bytes if transfer.total_bytes else 1.0
            bar = "#" * round(20 * share)
            table.add_row(
                f"[blue]{transfer.direction}",
                stage_id,
                f"{100 * share:5.1f} %",
                _gib(transfer.total_bytes),
                f"[blue]{bar:<20}",
            )
        return table

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            self.running[event.id] = (event.reason, 0.0, None)
        elif isinstance(event, Heartbeat) and event.id in self.running:
            self.running[event.id] = (self.running[event.id][0], event.elapsed_seconds, event.rss_bytes)
        elif isinstance(event, StageFinished):
            self.running.pop(event.result.id, None)
            self.transfers.pop(event.result.id, None)
            self.console.print(_result_line(event.result), soft_wrap=True)
        elif isinstance(event, Transfer):
            if event.done_bytes < event.total_bytes:
                self.transfers[event.id] = event
            else:
                self.transfers.pop(event.id, None)
        elif isinstance(event, RemoteWarning):
            self.console.print(f"[yellow]warning[/] {event.message}", soft_wrap=True, highlight=False)
        elif isinstance(event, WorkersReady):
            self.console.print(
                f"[dim]workers: stage modules imported once, in {event.import_seconds:.1f} s; "
                "each stage forks from there"
            )
        self.live.update(self._table())


def _result_line(result: StageResult) -> str:
    colour = {"hit": "green", "remote-hit": "blue", "built": "cyan", "skipped": "magenta"}[result.status]
    line = f"[{colour}]{result.status:>10}[/]  {result.id:<22}"
    if result.status == "built":
        line += f" {result.seconds:7.1f} s  peak {_gib(result.peak_memory_bytes)}"
    elif result.status == "skipped":
        line += f" [dim]{result.reason}"
    return line


def _preflight(workspace: Workspace, loaded: LoadedRecipe, graph, args: argparse.Namespace) -> None:
    """Before the first stage: the machine has the memory the largest stage needs (unless --force),
    and the artifacts folder the build publishes to is not another recipe's (unless --overwrite)."""
    from builder.artifacts import bundle_folder, check_claim
    from builder.stages.preflight import check_memory

    check_memory(loaded, graph, force=args.force)
    dest = bundle_folder(workspace.artifacts, loaded)
    check_claim(dest, loaded, workspace.root, overwrite=getattr(args, "overwrite", False))


def _publish(workspace: Workspace, loaded: LoadedRecipe, bundle: Path) -> Path:
    """Copy the bundle to artifacts/<name>/<version>/ (a variant: to its folder below that), unless
    it is already there, and point `latest` at the version."""
    from builder.artifacts import OWNER_FILE, bundle_folder, owner_record
    from builder.engine.publish import point_link, publish_tree

    recipe = loaded.recipe
    dest = bundle_folder(workspace.artifacts, loaded)
    manifest = bundle / "manifest.json"
    current = dest / "manifest.json"
    same = (
        current.is_file()
        and current.read_bytes() == manifest.read_bytes()
        and all(
            (dest / "Resources" / name).is_file() and (dest / "Resources" / name).stat().st_size == entry["size"]
            for name, entry in json.loads(manifest.read_text())["files"].items()
        )
    )
    if not same:
        needed = sum(entry["size"] for entry in json.loads(manifest.read_text())["files"].values())
        free = free_bytes(dest.parent)
        doing = f"publishing {dest.relative_to(workspace.root)}"
        if free is not None and free < needed:
            raise EnvironmentFault(
                f"{doing} needs {size_text(needed)}, but {dest.parent} has {size_text(free)} free",
                "free space there; the built stages stay cached, so the next build only publishes",
            )
        try:
            publish_tree(bundle, dest, extra={OWNER_FILE: owner_record(loaded, workspace.root)})
        except OSError as error:
            raise as_fault(error, doing, where=dest, needed_bytes=needed) or error from None
    point_link(workspace.artifacts / recipe.name / "latest", recipe.version)
    return dest


def _located(failure: StageFailed, loaded: LoadedRecipe, graph) -> UserError:
    """A stage failure told against the recipe: an expected one at the field its params came from,
    an unexpected one (a bug, or the machine) at the component whose stage failed."""
    if failure.stage_id is None or failure.stage_id not in graph:
        return failure
    spec = graph[failure.stage_id]
    if failure.expected and spec.param_origins:
        field = next(iter(spec.param_origins.values()))
    elif not failure.expected and spec.component is not None:
        field = f"components.{spec.component.split('.')[0]}"
    else:
        return failure
    return loaded.error(field, failure.message, failure.hint)


def _run(
    workspace: Workspace,
    loaded: LoadedRecipe,
    graph: Graph,
    console: Console,
    *,
    jobs: int,
    preflight: argparse.Namespace | None = None,
    executor: DaskExecutor | None = None,
) -> tuple[Engine, dict[str, StageResult]]:
    """Run `graph` with a live progress display (after the safety checks when `preflight` holds the
    command's arguments): the engine and the results by stage id. A failed stage becomes a located
    RecipeError."""
    if preflight is not None:
        _preflight(workspace, loaded, graph, preflight)
    engine = workspace.engine(loaded)
    progress = Progress(console)
    try:
        with progress.live:  # a no-op when everything is cached
            results = {r.id: r for r in engine.build(graph, jobs=jobs, on_event=progress, executor=executor)}
    except StageFailed as failure:
        raise _located(failure, loaded, graph) from None
    return engine, results


def cmd_build(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    from builder.stages.pipeline import build_graph

    started = time.monotonic()
    members = load_recipes(Path(args.recipe), workspace.root)
    if Path(args.recipe).is_dir() or members[0].variant is not None:
        from builder.recipe_sets import build_set

        return build_set(args, workspace, console, members, started)
    loaded = members[0]
    graph = build_graph(loaded)
    _preflight(workspace, loaded, graph, args)
    remote = workspace.remote_url()
    where = f"  remote {remote}" if remote is not None else ""
    console.print(f"[bold]sdbuild[/] {loaded.recipe.name} {loaded.recipe.version}  cache {workspace.cache}{where}")
    with _executor(args, workspace) as executor:
        engine, by_id = _run(workspace, loaded, graph, console, jobs=args.jobs, executor=executor)
    results = list(by_id.values())
    dest = _publish(workspace, loaded, engine.output_path(by_id["bundle"]))
    seconds = time.monotonic() - started
    built = sum(r.status == "built" for r in results)
    console.print(f"[bold green]done[/] in {seconds:.1f} s, {built} stage(s) built -> {dest}")
    if not all(r.status != "skipped" for r in results if r.stage == "compile"):
        console.print(
            "[magenta]not compiled[/]: Resources holds .mlpackage files; run the same build on a Mac "
            "with Xcode (same cache) to compile them to .mlmodelc"
        )
    if args.json:
        report = {
            "recipe": loaded.recipe.name,
            "version": loaded.recipe.version,
            "bundle": str(dest),
            "seconds": round(seconds, 3),
            "stages": [
                {
                    "id": r.id,
                    "stage": r.stage,
                    "component": r.component,
                    "status": r.status,
                    # A hit costs nothing now; what it cost when built is kept beside.
                    "seconds": round(r.seconds, 3) if r.status == "built" else 0.0,
                    "peak_memory_bytes": r.peak_memory_bytes if r.status == "built" else None,
                    "built_seconds": round(r.seconds, 3) if r.status in ("hit", "remote-hit") else None,
                    "reason": r.reason,
                }
                for r in results
            ],
        }
        print(json.dumps(report, indent=2))
    return 0


@contextmanager
def _executor(args: argparse.Namespace, workspace: Workspace) -> Iterator[DaskExecutor | None]:
    """The Dask executor `--executor dask` asks for (connected, or its LocalCluster started), else None."""
    kind = getattr(args, "executor", "local")
    scheduler = getattr(args, "scheduler", None)
    if kind == "local":
        if scheduler is not None:
            raise UserError("--scheduler is for the Dask executor", "add --executor dask, or drop --scheduler")
        yield None
        return
    from builder.engine.memory import available_memory_bytes
    from builder.remote.dask_executor import dask_executor

    with dask_executor(workspace.remote(), scheduler, workspace.cache, available_memory_bytes()) as executor:
        yield executor


def _refuse_controlnets(loaded: LoadedRecipe, command: str) -> None:
    """Analysis and reports run the plain UNet; a recipe with ControlNets builds the ControlledUnet."""
    if loaded.recipe.model.controlnets:
        raise UserError(
            f"`sdbuild {command}` runs the plain UNet, "
            f"but {loaded.path.name} builds a ControlledUnet (model.controlnets)",
            hint="run it on a copy of the recipe without model.controlnets and components.controlnet",
        )


def cmd_report(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    from builder.report import write_report
    from builder.report.report import DEFAULT_PROMPTS, DEFAULT_SEEDS
    from builder.stages.pipeline import build_graph

    loaded = workspace.load(args.recipe)
    _refuse_controlnets(loaded, "report")
    graph = build_graph(loaded)
    engine, results = _run(workspace, loaded, graph, console, jobs=args.jobs, preflight=args)
    bundle = _publish(workspace, loaded, engine.output_path(results["bundle"]))
    # The diffusers folder the bundle was made from: the source stage's output, or a local folder read in place.
    local = loaded.recipe.model.local
    pipeline = engine.output_path(results["source"]) if local is None else local.path
    if args.candidates is not None and not args.candidates.is_file():
        raise UserError(f"no candidates file {args.candidates}", hint="pass the JSON list `sdbuild analyze` wrote")
    try:
        report = write_report(
            bundle,
            pipeline=pipeline,
            verified=[engine.output_path(r) for stage_id, r in results.items() if stage_id.startswith("verify:unet")],
            candidates=args.candidates,
            prompts=args.prompts or DEFAULT_PROMPTS,
            seeds=args.seeds or DEFAULT_SEEDS,
            steps=args.steps,
        )
    except ValueError as problem:  # e.g. linear-quantized weights, which cannot be read back yet
        raise UserError(
            f"cannot report on {bundle}: {problem}", hint="report on a float16 or palettized bundle"
        ) from None
    console.print(f"[bold green]report[/] -> {report}")
    return 0


def cmd_generate(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """An image from the recipe's built bundle: Core ML on macOS, the verified torch modules elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    from builder.generate.backend import choose_backend
    from builder.generate.built import locate
    from builder.generate.images import write_png
    from builder.generate.request import Request
    from builder.generate.run import generate
    from builder.stages.pipeline import build_graph

    loaded = workspace.load(args.recipe)
    bundle = locate(loaded, build_graph(loaded), workspace.engine(loaded), workspace.artifacts)
    backend = choose_backend(args.backend)
    described = {"coreml": f"Core ML ({bundle.manifest.compute_unit})", "torch": "torch (the verified modules)"}
    console.print(f"[bold]generate[/] {bundle.path}  backend {described[backend]}")
    request = Request(
        prompt=args.prompt,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance,
        init_image=args.init_image,
        strength=args.strength,
        control_images=tuple(args.control_images or ()),
        refiner_start=args.refiner_start,
    )
    out = args.out or workspace.root / f"{loaded.recipe.name}-seed{args.seed}.png"
    with Bar("denoising", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("denoising", total=None)
        pixels = generate(bundle, backend, request, lambda done, total: bar.update(task, completed=done, total=total))
    write_png(out, pixels)
    console.print(f"[bold green]image[/] -> {out} ({pixels.shape[1]}x{pixels.shape[0]}, backend {backend})")
    return 0


def cmd_analyze(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Mixed-bit analysis of the recipe's UNet (or refiner UNet): candidate recipes at a series of PSNR targets."""
    from builder.engine.publish import publish_tree
    from builder.stages.pipeline import analysis_graph

    loaded = workspace.load(args.recipe)
    _refuse_controlnets(loaded, "analyze")
    component = args.component
    graph = analysis_graph(loaded, component, args.chunks)
    engine, results = _run(workspace, loaded, graph, console, jobs=args.jobs, preflight=args)
    analysis = engine.output_path(results[f"analyze:{component}"])
    dest = workspace.artifacts / loaded.recipe.name / ("mbp" if component == "unet" else f"mbp-{component}")
    publish_tree(analysis, dest)
    summary = json.loads((analysis / "analysis.json").read_text())
    table = Table(
        title=f"mixed-bit candidates for {loaded.recipe.name} "
        f"(UNet evaluations in the search: {summary['unet_evaluations']})"
    )
    for column in ("target dB", "latents dB", "single call dB", "bits/weight", "MB", "recipe file"):
        table.add_column(column)
    for candidate in summary["candidates"]:
        name = f"{candidate['target_psnr_db']:g}db.yaml"
        table.add_row(
            f"{candidate['target_psnr_db']:g}",
            f"{candidate['psnr_db']:.2f}",
            f"{candidate['single_call_psnr_db']:.2f}",
            f"{candidate['bits_per_weight']:.2f}",
            f"{candidate['size_bytes'] / 1e6:.2f}",
            str(dest / "recipes" / name),
        )
    console.print(table)
    return 0


def _build_unet_rewrite(workspace: Workspace, loaded: LoadedRecipe, console: Console, jobs: int) -> Path:
    """The recipe's rewritten UNet (and its source), built or taken from the cache."""
    from builder.stages.pipeline import build_graph

    full = build_graph(loaded)
    graph = Graph([full[stage_id] for stage_id in ("source", "rewrite:unet") if stage_id in full])
    engine, results = _run(workspace, loaded, graph, console, jobs=jobs)
    return engine.output_path(results["rewrite:unet"])


def cmd_import_mbp(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Apple's published mixed-bit pre-analysis JSON as recipe files for this recipe's UNet."""
    from builder.sd.mbp.layers import conversion_layers
    from builder.sd.mbp.recipe_file import import_apple_preanalysis, write_recipe_file

    loaded = workspace.load(args.recipe)
    if not args.json_file.is_file():
        raise UserError(f"no pre-analysis file {args.json_file}", hint="download Apple's JSON for this model first")
    layers = conversion_layers(_build_unet_rewrite(workspace, loaded, console, args.jobs))
    imported = import_apple_preanalysis(args.json_file, [layer.identity for layer in layers])
    out = args.out or workspace.root / "recipes" / "mbp"
    out.mkdir(parents=True, exist_ok=True)
    for key, recipe in sorted(imported.recipes.items()):
        path = out / f"{loaded.recipe.name}-{key}.yaml"
        write_recipe_file(recipe, path)
        console.print(f"wrote {path} ({recipe.bits_per_weight:.2f} bits/weight, {recipe.psnr_db:.2f} dB)")
    if imported.unmapped:
        console.print(
            f"[yellow]{len(imported.unmapped)} layer name(s) of the JSON name no layer of this UNet[/], e.g. "
            f"{imported.unmapped[0]}: they keep the recipe's default"
        )
    return 0


def cmd_plan(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    from builder.stages.pipeline import build_graph

    loaded = workspace.load(args.recipe)
    graph = build_graph(loaded)
    _preflight(workspace, loaded, graph, args)
    entries = workspace.engine(loaded).plan(graph)
    if args.json:
        print(
            json.dumps(
                [e.model_dump(include={"id", "stage", "component", "status", "reason", "key"}) for e in entries],
                indent=2,
            )
        )
        return 0
    table = Table(title=f"{loaded.recipe.name} {loaded.recipe.version}")
    for column in ("stage", "component", "status", "reason"):
        table.add_column(column)
    colours = {"cached": "green", "stale": "yellow", "skipped": "magenta"}
    for e in entries:
        table.add_row(e.stage, e.component or "", f"[{colours[e.status]}]{e.status}", e.reason)
    console.print(table)
    return 0


def cmd_explain(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    from builder.stages.pipeline import build_graph

    loaded = workspace.load(args.recipe)
    graph = build_graph(loaded)
    explanation = workspace.engine(loaded).explain(graph, args.stage)
    print(explanation.model_dump_json(indent=2))
    return 0


def cmd_fetch(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Download every hub input of a recipe into the Hugging Face cache, so a later build works offline."""
    from builder.hub.cache import hub_cache_dir
    from builder.hub.fetch import HubInput, fetch, hub_inputs

    loaded = workspace.load(args.recipe)
    inputs = hub_inputs(loaded)

    def announce(item: HubInput, files: int, size: int, to_download: int) -> None:
        console.print(
            f"{item.ref}: {files} file(s), {_gb(size)}; {_gb(size - to_download)} already in the cache, "
            f"{_gb(to_download)} to download"
        )

    fetched = []
    for item in inputs:
        try:
            fetched.append(fetch(item, announce))
        except UserError as error:
            raise loaded.error(item.field, error.message, error.hint) from None
    size = sum(f.size_bytes for f in fetched)
    downloaded = sum(f.downloaded_bytes for f in fetched)
    if not inputs:
        console.print(f"{loaded.path.name} has no hub inputs: nothing to fetch")
    else:
        console.print(
            f"[bold green]fetched[/] {len(fetched)} input(s), {_gb(size)} in {hub_cache_dir()} "
            f"({_gb(downloaded)} downloaded); builds of this recipe now work with HF_HUB_OFFLINE=1"
        )
    if args.json:
        report = {
            "recipe": loaded.recipe.name,
            "cache": str(hub_cache_dir()),
            "size_bytes": size,
            "downloaded_bytes": downloaded,
            "inputs": [f.model_dump() for f in fetched],
        }
        print(json.dumps(report, indent=2))
    return 0


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def cmd_schema(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    if args.manifest:
        from builder.sd.manifest import manifest_json_schema

        print(json.dumps(manifest_json_schema(), indent=2))
        return 0
    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def cmd_verify(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    problems = Engine(workspace.cache, target="verify").verify(full=args.full)
    for problem in problems:
        console.print(f"[red]problem[/] {problem}")
    console.print(f"{len(problems)} problem(s) in {workspace.cache}")
    return 1 if problems else 0


def cmd_gc(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    report = Engine(workspace.cache, target="gc").gc()
    console.print(
        f"removed {report.removed_actions} action(s), {report.removed_objects} object(s), "
        f"freed {_gib(report.freed_bytes)}"
    )
    return 0


def cmd_status(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    from builder.recipe_sets import status

    return status(args, workspace, console)


def _transfer_progress(progress: Progress) -> Callable[[str], Callable[[int, int], None]]:
    def for_entry(name: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            progress(Transfer(id=name, direction="download", done_bytes=done, total_bytes=total))

        return report

    return for_entry


def _required_remote(workspace: Workspace, command: str) -> RemoteCache:
    remote = workspace.remote()
    if remote is None:
        raise UserError(
            f"`sdbuild {command}` needs a remote cache",
            "pass --remote URL (e.g. s3://bucket/sdbuild or file:///shared/sdbuild-cache) or set SDBUILD_REMOTE",
        )
    return remote


def cmd_pull(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Download the recipe's stages from the remote into the local cache, without building."""
    from builder.remote.sync import pull
    from builder.stages.pipeline import build_graph

    loaded = workspace.load(args.recipe)
    remote = _required_remote(workspace, "pull")
    progress = Progress(console)
    with progress.live:
        engine = Engine(workspace.cache, target=loaded.recipe.name, inputs_root=workspace.root)
        moved = pull(engine, build_graph(loaded), remote, _transfer_progress(progress))
    for entry in moved:
        console.print(f"{entry.status:>9}  {entry.id:<22} [dim]{entry.detail}", soft_wrap=True, highlight=False)
    pulled = sum(entry.status == "pulled" for entry in moved)
    missing = sum(entry.status in ("missing", "unusable") for entry in moved)
    console.print(f"pulled {pulled} stage(s) from {remote.url}; {missing} not available there")
    if args.json:
        print(json.dumps([entry.model_dump() for entry in moved], indent=2))
    return 0


def cmd_push(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Upload local cache entries the remote lacks: the recipe's last build, or every entry."""
    from builder.remote.sync import push

    remote = _required_remote(workspace, "push")
    keys: list[str] | None = None
    if args.recipe is not None:
        loaded = workspace.load(args.recipe)
        index = Engine(workspace.cache, target=loaded.recipe.name).store.load_index(loaded.recipe.name)
        keys = sorted(set(index.values()))
        if not keys:
            raise UserError(f"{loaded.recipe.name} was never built in {workspace.cache}", "build it first")
    engine = Engine(workspace.cache, target="push")
    progress = Progress(console)
    with progress.live:
        moved = push(engine, remote, keys, _transfer_progress(progress))
    for entry in moved:
        if entry.status != "present":
            console.print(f"{entry.status:>9}  {entry.id[:12]} [dim]{entry.detail}", soft_wrap=True, highlight=False)
    pushed = sum(entry.status == "pushed" for entry in moved)
    present = sum(entry.status == "present" for entry in moved)
    console.print(f"pushed {pushed} entr{'y' if pushed == 1 else 'ies'} to {remote.url}; {present} already there")
    if args.json:
        print(json.dumps([entry.model_dump() for entry in moved], indent=2))
    return 1 if any(entry.status in ("unusable", "missing") for entry in moved) else 0


def _add_remote(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--remote",
        default=None,
        metavar="URL",
        help="shared cache, e.g. s3://bucket/prefix or file:///shared/folder (default: $SDBUILD_REMOTE)",
    )


def _add_safety_overrides(command: argparse.ArgumentParser, *, overwrite: bool) -> None:
    command.add_argument(
        "--force", action="store_true", help="build even if the memory estimate exceeds this machine's memory"
    )
    if overwrite:
        command.add_argument(
            "--overwrite",
            action="store_true",
            help="replace artifacts/<name>/<version>/ even if another recipe published it",
        )


def cmd_doctor(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """What this environment lacks to build (the recipe): one line per check; exit 2 when any fails."""
    from builder.doctor.environment import environment_checks
    from builder.doctor.lockfile import LOCK_FILE
    from builder.doctor.resources import disk_check, hub_cache_checks, memory_check

    loaded = workspace.load(args.recipe) if args.recipe else None
    checks = environment_checks(LOCK_FILE)
    if loaded is not None:
        checks += [disk_check(loaded, workspace.cache), memory_check(loaded)]
    checks += hub_cache_checks(loaded, args.recipe)
    for check in checks:
        print(check.line())
    failed = [check.name for check in checks if check.status == "fail"]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/]: {', '.join(failed)}")
        return EXIT_USER_ERROR
    return 0


def _build_args(args: argparse.Namespace, recipe: str) -> argparse.Namespace:
    """What `build` is given when another command builds first (no JSON report; its safety overrides)."""
    return argparse.Namespace(
        recipe=recipe, jobs=args.jobs, json=False, force=args.force, overwrite=getattr(args, "overwrite", False)
    )


def cmd_release(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Build if needed, then write dist/<name>-<version>.zip and its .sha256 (reproducible bytes)."""
    from builder.release.archive import write_archive

    recipe = workspace.load(args.recipe).recipe
    cmd_build(_build_args(args, args.recipe), workspace, console)
    bundle = workspace.artifacts / recipe.name / recipe.version
    out = args.out if args.out is not None else workspace.root / "dist"
    archive, digest = write_archive(bundle, out, recipe.name, recipe.version)
    console.print(f"[bold green]released[/] {archive} (sha256 in {archive.name}.sha256)")
    print(f"{digest}  {archive}")
    return 0


@contextmanager
def _environment_variable(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` (unset for None) while the block runs; workers inherit it."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def cmd_reproduce(args: argparse.Namespace, workspace: Workspace, console: Console) -> int:
    """Rebuild a release archive from the recipe in its manifest, in a temporary workspace, and
    compare every file's digest: exit 0 when all match, 1 when any differs."""
    import tempfile

    from builder.engine.files import remove_tree
    from builder.release import reproduce
    from builder.stages.tools import compile_unavailable

    archive = reproduce.read_archive(args.archive)
    manifest = archive.manifest
    unavailable = compile_unavailable()
    if manifest.get("compiled") and unavailable:
        raise UserError(
            f"{args.archive.name} holds compiled models (.mlmodelc), which cannot be rebuilt here: {unavailable}",
            hint="reproduce it on a Mac with Xcode, or reproduce the archive the Linux build released",
        )
    for note in reproduce.environment_notes(manifest):
        console.print(f"[yellow]note[/] {note}", soft_wrap=True)
    work = Path(tempfile.mkdtemp(prefix=".sdbuild-reproduce-", dir=workspace.root))
    try:
        recipe_file = reproduce.write_recipe(manifest, work)
        rebuild = Workspace(
            work, workspace.cache if args.reuse_cache else work / ".sdbuild-cache", remote_from_env=args.reuse_cache
        )
        recipe = rebuild.load(str(recipe_file)).recipe
        console.print(f"[bold]reproducing[/] {args.archive.name} in {work}")
        with _environment_variable("SOURCE_DATE_EPOCH", reproduce.source_date_epoch(manifest)):
            cmd_build(_build_args(args, str(recipe_file)), rebuild, console)
        bundle = rebuild.artifacts / recipe.name / recipe.version
        rebuilt = reproduce.bundle_digests(bundle)
        differences = reproduce.compare(archive.digests, rebuilt)
        for d in differences:
            if d.archived is None:
                line = f"only in the rebuild  {d.name}"
            elif d.rebuilt is None:
                line = f"only in the archive  {d.name}"
            else:
                line = f"differs  {d.name}: archive {d.archived[:16]}, rebuilt {d.rebuilt[:16]}"
            if d.name == "manifest.json" and d.rebuilt is not None:
                fields = reproduce.manifest_fields_differing(
                    manifest, json.loads((bundle / "manifest.json").read_text())
                )
                line += f" (fields: {', '.join(fields)})"
            console.print(f"[red]{line}", soft_wrap=True, highlight=False)
        checksum = reproduce.check_checksum_file(args.archive)
        if checksum:
            console.print(f"[red]checksum[/] {checksum}", soft_wrap=True)
        total = len(set(archive.digests) | set(rebuilt))
        if differences or checksum:
            console.print(f"[bold red]not reproduced[/]: {len(differences)} of {total} files differ")
            return 1
        console.print(f"[bold green]reproduced[/]: all {total} files match the rebuild")
        return 0
    finally:
        if args.keep:
            console.print(f"kept the rebuild in {work}")
        else:
            remove_tree(work)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbuild", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path.cwd(), help="workspace root (default: current folder)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache folder (default: $SDBUILD_CACHE_DIR or <workspace>/.sdbuild-cache)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build", help="build a recipe (each variant of a matrix; every recipe of a folder) into artifacts/"
    )
    build.add_argument("recipe", help="a recipe file, or a folder: every recipe in it, in one graph")
    build.add_argument("--json", action="store_true", help="print a JSON report of every stage on stdout")
    build.add_argument("--jobs", type=int, default=2, help="stages run at once when memory allows (default 2)")
    _add_remote(build)
    build.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="where stages run: worker processes here (default), or Dask workers sharing the remote cache",
    )
    build.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:8786",
        help="the Dask scheduler to use (default with --executor dask: a LocalCluster of two workers here)",
    )
    _add_safety_overrides(build, overwrite=True)
    build.set_defaults(run=cmd_build)

    plan = commands.add_parser("plan", help="show which stages are cached or stale, and why")
    plan.add_argument("recipe")
    plan.add_argument("--json", action="store_true")
    _add_safety_overrides(plan, overwrite=True)
    plan.set_defaults(run=cmd_plan)

    explain = commands.add_parser("explain", help="show a stage's key inputs now and at its last build")
    explain.add_argument("recipe")
    explain.add_argument("stage", help="stage id, e.g. palettize:unet (see `sdbuild plan`)")
    explain.set_defaults(run=cmd_explain)

    report = commands.add_parser("report", help="build if needed, then write artifacts/<name>/<version>/report/")
    report.add_argument("recipe")
    report.add_argument(
        "--candidates", type=Path, default=None, help="JSON list of {name, average_bits, size_bytes, psnr_db} to plot"
    )
    report.add_argument(
        "--prompt", dest="prompts", action="append", help="prompt for the side-by-side images (repeatable)"
    )
    report.add_argument("--seed", dest="seeds", type=int, action="append", help="seed for the images (repeatable)")
    report.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    report.add_argument("--jobs", type=int, default=2, help="stages run at once if the bundle must be built")
    _add_safety_overrides(report, overwrite=True)
    report.set_defaults(run=cmd_report)

    generate = commands.add_parser("generate", help="an image from the recipe's built bundle (PNG)")
    generate.add_argument("recipe")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    generate.add_argument(
        "--out", type=Path, default=None, help="PNG to write (default <workspace>/<name>-seed<S>.png)"
    )
    generate.add_argument(
        "--control-image",
        dest="control_images",
        type=Path,
        action="append",
        help="conditioning image of a ControlNet bundle (one per ControlNet, in the manifest's order)",
    )
    generate.add_argument("--init-image", type=Path, default=None, help="image to image: start from this image")
    generate.add_argument(
        "--strength", type=float, default=0.75, help="image to image: how much of the image is redrawn (default 0.75)"
    )
    generate.add_argument(
        "--refiner-start",
        type=float,
        default=REFINER_START,
        help=f"SDXL with a refiner: fraction of the steps the base UNet runs (default {REFINER_START})",
    )
    generate.add_argument(
        "--backend", choices=("auto", "coreml", "torch"), default="auto", help="auto: Core ML on macOS, else torch"
    )
    generate.set_defaults(run=cmd_generate)

    analyze = commands.add_parser("analyze", help="mixed-bit palettization analysis of the recipe's UNet")
    analyze.add_argument("recipe")
    analyze.add_argument("--component", choices=ANALYSED_COMPONENTS, default="unet", help="the UNet to analyse")
    analyze.add_argument("--chunks", type=int, default=16, help="layers are measured in this many cached chunks")
    analyze.add_argument("--jobs", type=int, default=2)
    _add_safety_overrides(analyze, overwrite=False)
    analyze.set_defaults(run=cmd_analyze)

    imported = commands.add_parser("import-mbp", help="convert Apple's mixed-bit pre-analysis JSON into recipe files")
    imported.add_argument("recipe", help="the recipe whose UNet the JSON describes")
    imported.add_argument("json_file", type=Path)
    imported.add_argument("--out", type=Path, default=None, help="folder for the recipe files (default recipes/mbp)")
    imported.add_argument("--jobs", type=int, default=2)
    imported.set_defaults(run=cmd_import_mbp)

    fetch = commands.add_parser(
        "fetch", help="download the recipe's hub inputs into the Hugging Face cache, so builds work offline"
    )
    fetch.add_argument("recipe")
    fetch.add_argument("--json", action="store_true", help="print what was fetched as JSON on stdout")
    fetch.set_defaults(run=cmd_fetch)

    schema = commands.add_parser("schema", help="print the recipe JSON Schema (for editor validation)")
    schema.add_argument("--manifest", action="store_true", help="print the JSON Schema of manifest.json instead")
    schema.set_defaults(run=cmd_schema)

    doctor = commands.add_parser("doctor", help="check that this environment can build (the recipe); exit 2 if not")
    doctor.add_argument("recipe", nargs="?", help="also check disk, memory and hub inputs for this recipe")
    doctor.set_defaults(run=cmd_doctor)

    release = commands.add_parser("release", help="build if needed, then write dist/<name>-<version>.zip and .sha256")
    release.add_argument("recipe")
    release.add_argument("--out", type=Path, default=None, help="folder for the archive (default: <workspace>/dist)")
    release.add_argument("--jobs", type=int, default=2, help="stages run at once if the bundle must be built")
    _add_safety_overrides(release, overwrite=True)
    release.set_defaults(run=cmd_release)

    reproduce = commands.add_parser(
        "reproduce", help="rebuild a release archive from its manifest's recipe and compare every file's digest"
    )
    reproduce.add_argument("archive", type=Path)
    reproduce.add_argument(
        "--reuse-cache", action="store_true", help="build with the workspace's cache instead of an empty one"
    )
    reproduce.add_argument("--keep", action="store_true", help="keep the temporary workspace of the rebuild")
    reproduce.add_argument("--jobs", type=int, default=2)
    _add_safety_overrides(reproduce, overwrite=False)
    reproduce.set_defaults(run=cmd_reproduce)

    verify = commands.add_parser("verify", help="check every cached output against its recorded digests")
    verify.add_argument("--full", action="store_true", help="re-hash every file instead of trusting the stat memo")
    verify.set_defaults(run=cmd_verify)

    commands.add_parser("gc", help="remove cache entries no recipe's last build uses").set_defaults(run=cmd_gc)

    status = commands.add_parser(
        "status", help="one line per recipe and variant: built, stale (and why) or never built"
    )
    status.add_argument("recipes", nargs="?", default=None, help="a recipe file or folder (default: recipes/)")
    status.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    status.set_defaults(run=cmd_status)

    push = commands.add_parser("push", help="upload local cache entries the remote cache lacks")
    push.add_argument("recipe", nargs="?", help="only the entries of this recipe's last build (default: all)")
    push.add_argument("--json", action="store_true", help="print every entry's fate as JSON on stdout")
    _add_remote(push)
    push.set_defaults(run=cmd_push)

    pull = commands.add_parser("pull", help="download a recipe's stages from the remote cache without building")
    pull.add_argument("recipe")
    pull.add_argument("--json", action="store_true", help="print every stage's fate as JSON on stdout")
    _add_remote(pull)
    pull.set_defaults(run=cmd_pull)
    return parser


def _doing(workspace: Workspace, filename: object) -> str:
    """What a failed write was for, from where it went."""
    path = Path(str(filename)).absolute() if filename else None
    if path is not None and path.is_relative_to(workspace.cache):
        return f"writing the cache {workspace.cache}"
    if path is not None and path.is_relative_to(workspace.artifacts):
        return f"writing {workspace.artifacts}"
    return "writing"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Progress goes to stderr so `--json` output on stdout stays machine-readable.
    console = Console(stderr=True)
    workspace = Workspace(args.workspace, args.cache_dir, getattr(args, "remote", None))
    try:
        return args.run(args, workspace, console)
    except UserError as error:
        console.print(error.render(), markup=False, highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except OSError as error:  # disk full, read-only, permission denied, name too long: the machine's side
        fault = as_fault(error, _doing(workspace, error.filename))
        if fault is None:
            raise
        console.print(fault.render(), markup=False, highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `sdbuild plan --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        console.print("interrupted: finished stages are cached; run the same command again to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
