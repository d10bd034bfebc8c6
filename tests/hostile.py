"""Hostile and broken recipes, and `sdbuild plan` run on them in process: shared by the catalogue
and fuzz tests and by bench/hostile_inputs.py, which counts how a checkout handles them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

VALID = (
    "name: tiny-sd\n"  # 1
    "version: 0.1.0\n"  # 2
    "family: sd\n"  # 3
    "model:\n"  # 4
    "  synthetic: {preset: tiny-sd, seed: 0}\n"  # 5
    "latent_size: [16, 16]\n"  # 6
    "attention: ORIGINAL\n"  # 7
    "compute_unit: CPU_AND_GPU\n"  # 8
    "deployment_target: macOS13\n"  # 9
    "unet_batch_size: 2\n"  # 10
    "components:\n"  # 11
    "  text_encoder: {}\n"  # 12
    "  unet:\n"  # 13
    "    compression: {mode: palettize, nbits: 6}\n"  # 14
    "  vae_decoder: {}\n"  # 15
)
SOURCE = "  synthetic: {preset: tiny-sd, seed: 0}\n"


def local(path: str) -> str:
    return VALID.replace(SOURCE, f"  local: {{path: {path}}}\n")


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    text = 'a0: &a0 ["lol"]\n'
    for level in range(1, levels):
        text += f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * width)}]\n"
    return VALID + text


def _tiny_pipeline(folder: Path) -> None:
    """A diffusers-shaped folder with configs and (empty) safetensors, enough for plan-time checks."""
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for sub in ("text_encoder", "unet", "vae"):
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "config.json").write_text("{}")
        (folder / sub / "model.safetensors").write_bytes(b"")


@dataclass(frozen=True)
class Case:
    """One bad input: the recipe text (or a setup writing files), and what the error must mention."""

    name: str
    text: str
    needle: str
    line: bool = True  # the error names a line (not for a file that cannot be read at all)
    where: str | None = None  # the file the error names, when not the recipe itself (e.g. a base)


def catalogue(workspace: Path, outside: Path) -> list[Case]:
    """The issue's categories; writes the folders and links the cases need under `workspace`
    (and a secret file in `outside`, which must never be read)."""
    models = workspace / "models"
    models.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text("secret")
    (models / "empty").mkdir(exist_ok=True)
    pickles = models / "pickles"
    pickles.mkdir(exist_ok=True)
    (pickles / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for sub in ("text_encoder", "unet", "vae"):
        (pickles / sub).mkdir(exist_ok=True)
        (pickles / sub / "config.json").write_text("{}")
        (pickles / sub / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    for name in ("file-link", "dir-link", "huge-config", "sdxl-index", "fifo"):
        _tiny_pipeline(models / name)
    _link(models / "file-link" / "unet" / "extra.safetensors", outside / "secret.txt")
    _link(models / "dir-link" / "tokenizer", outside)
    config = {"num_hidden_layers": 10**6, "hidden_size": 768, "num_attention_heads": 12}
    (models / "huge-config" / "text_encoder" / "config.json").write_text(json.dumps(config))
    (models / "sdxl-index" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    if not (models / "fifo" / "unet" / "config.json.fifo").exists():
        os.mkfifo(models / "fifo" / "unet" / "config.json.fifo")
    recipes = workspace / "recipes"
    recipes.mkdir(exist_ok=True)
    _link(recipes / "loop-a.yaml", recipes / "loop-b.yaml")
    _link(recipes / "loop-b.yaml", recipes / "loop-a.yaml")
    (recipes / "base-a.yaml").write_text("extends: base-b.yaml\n")
    (recipes / "base-b.yaml").write_text("extends: base-a.yaml\n")
    long_name = "a" * 260
    return [
        Case("alias bomb", alias_bomb(), "aliases"),
        Case("alias expansion", alias_bomb(levels=7, width=9).replace("*a5, *a5", "*a5"), "values"),
        Case("10k unknown keys", VALID + "".join(f"k{i}: 1\n" for i in range(10_000)), "values"),
        Case("1500 unknown keys", VALID + "".join(f"k{i}: 1\n" for i in range(1_500)), "1500 unknown fields"),
        Case("deep nesting", VALID + "x: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        Case("deep mapping", VALID + "".join("  " * i + f"k{i}:\n" for i in range(200)), "nested"),
        Case("integer beyond the digit limit", VALID.replace("seed: 0", "seed: " + "9" * 5000), "seed"),
        Case("seed 10^26", VALID.replace("seed: 0", "seed: " + "1" + "0" * 26), "seed"),
        Case("negative seed", VALID.replace("seed: 0", "seed: -1"), "seed"),
        Case("long name", VALID.replace("name: tiny-sd", f"name: {long_name}"), "at most 64"),
        Case("long version", VALID.replace("version: 0.1.0", "version: 0.1.0-" + "a" * 300), "version"),
        Case("bool batch", VALID.replace("unet_batch_size: 2", "unet_batch_size: true"), "unet_batch_size"),
        Case("float batch", VALID.replace("unet_batch_size: 2", "unet_batch_size: 2.0"), "unet_batch_size"),
        Case("bool nbits", VALID.replace("nbits: 6", "nbits: true"), "nbits"),
        Case("string size", VALID.replace("[16, 16]", "['16', 16]"), "latent_size"),
        Case("int chunk flag", VALID + "chunk_unet: 1\n", "chunk_unet"),
        Case("huge latent", VALID.replace("[16, 16]", "[100000, 100000]"), "latent_size"),
        Case("huge image", VALID.replace("latent_size: [16, 16]", "image_size: [65536, 512]"), "image_size"),
        Case("zero latent", VALID.replace("[16, 16]", "[0, 16]"), "latent_size"),
        Case("sdxl preset under sd", VALID.replace("preset: tiny-sd,", "preset: tiny-sdxl,"), "family"),
        Case("sd preset under sdxl", VALID.replace("family: sd", "family: sdxl"), "text_encoder_2"),
        Case("empty local folder", local("../models/empty"), "no files"),
        Case("empty path", local("''"), "empty"),
        Case("pickle-only folder", local("../models/pickles"), "pickled"),
        Case("file link outside", local("../models/file-link"), "outside the workspace"),
        Case("dir link outside", local("../models/dir-link"), "outside the workspace"),
        Case("huge text encoder config", local("../models/huge-config"), "num_hidden_layers"),
        Case("sdxl folder under sd", local("../models/sdxl-index"), "StableDiffusionXL"),
        Case("fifo in folder", local("../models/fifo"), "not a regular file"),
        Case("path outside", local(f"{outside}"), "outside the workspace"),
        Case("long path", local("x" * 300), "too long"),
        Case("nul in path", local('"a\\0b"'), "path"),
        Case("invalid date", VALID + "when: 2024-13-45\n", "cannot read"),
        Case("python tag", VALID + "x: !!python/object/apply:os.system ['true']\n", "not supported"),
        Case("python scalar tag", VALID + "x: !!python/name:os.system\n", "invalid YAML"),
        Case("binary garbage", "\x00\x01\x02name: x\n", "invalid YAML"),
        Case("top-level list", "- a\n- b\n", "mapping"),
        Case("extends loop", "extends: base-a.yaml\n", "loop", where="recipes/base-b.yaml"),
        Case("extends outside", f"extends: {outside}/secret.txt\n", "outside the workspace"),
        Case("recipe symlink loop", "@loop-a.yaml", "loop", line=False),
    ]


def _link(link: Path, target: Path) -> None:
    if not link.is_symlink():
        link.symlink_to(target)


@dataclass
class Outcome:
    code: int | str
    output: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return not isinstance(self.code, int) or "Traceback" in self.output

    def located(self, file: str, line: bool = True) -> bool:
        """One error block naming the file (and a line), with a fix."""
        pattern = re.escape(file) + (r":\d+: " if line else r"[: ]")
        return bool(re.search(r"^error: [^\n]*" + pattern, self.output, re.M)) and "fix:" in self.output


def plan(workspace: Path, recipe: str, *extra: str) -> Outcome:
    """`sdbuild plan` in this process; an exception escaping main is a traceback."""
    from builder.cli import main

    output = io.StringIO()
    started = time.monotonic()
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        with contextlib.redirect_stderr(output), contextlib.redirect_stdout(io.StringIO()):
            code: int | str = main(
                ["--workspace", str(workspace), "--cache-dir", str(workspace / "cache"), "plan", recipe, *extra]
            )
    except Exception as error:  # whatever escapes main is what the test reports
        code = f"{type(error).__name__}: {str(error)[:200]}"
    finally:
        os.chdir(cwd)
    return Outcome(code, output.getvalue(), time.monotonic() - started)


def write_case(workspace: Path, case: Case) -> str:
    """The case's recipe file (relative to the workspace); '@name' names an existing file."""
    if case.text.startswith("@"):
        return f"recipes/{case.text[1:]}"
    name = "recipes/" + re.sub(r"[^a-z0-9]+", "-", case.name.lower()) + ".yaml"
    (workspace / name).write_text(case.text, encoding="utf-8", errors="surrogateescape")
    return name
