"""Bad input never yields a traceback: each mistake exits non-zero naming file, line, field and fix."""

from __future__ import annotations

import contextlib
import io

from conftest import Workspace
from hostile import VALID  # the valid recipe, line by line

from builder.cli import main


def _fails(ws: Workspace, text: str | None, *needles: str, env: dict | None = None, recipe: str = "recipes/bad.yaml"):
    """`sdbuild build` of a bad recipe: in this process (the subject is the message, not the process),
    or in a fresh interpreter when the test sets environment variables libraries read at import."""
    if text is not None:
        (ws.root / recipe).write_text(text)
    if env is None:
        code, output = _in_process(ws, "build", recipe)
    else:
        done = ws.run("build", recipe, env=env)
        code, output = done.returncode, done.stderr + done.stdout
    assert code != 0
    assert "Traceback" not in output
    message = " ".join(output.split())
    for needle in needles:
        assert needle in message, (needle, output)
    assert "fix:" in message
    # Nothing is built for a recipe that does not validate.
    assert not (ws.root / "artifacts").exists() or not any((ws.root / "artifacts").iterdir())
    return message


def _in_process(ws: Workspace, *args: str) -> tuple[int, str]:
    """Exit status and everything printed by `builder.cli.main`, run from the workspace; an exception
    escaping it (what a user would see as a traceback) fails the test."""
    with contextlib.chdir(ws.root), contextlib.redirect_stderr(io.StringIO()) as err:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(["--workspace", str(ws.root), "--cache-dir", str(ws.cache), *args])
    return code, err.getvalue() + out.getvalue()


def test_unknown_field(workspace):
    _fails(workspace, VALID.replace("attention:", "attenton:"), "bad.yaml:7", "attenton", "attention")


def test_wrong_enum_value(workspace):
    _fails(workspace, VALID.replace("CPU_AND_GPU", "GPU"), "bad.yaml:8", "compute_unit", "CPU_AND_NE")


def test_nbits_five(workspace):
    _fails(
        workspace,
        VALID.replace("nbits: 6", "nbits: 5"),
        "bad.yaml:14",
        "components.unet.compression.nbits",
        "1, 2, 3, 4, 6",
    )


def test_missing_recipe_file(workspace):
    _fails(workspace, None, "recipes/nope.yaml", "tiny-sd.yaml", recipe="recipes/nope.yaml")


def test_malformed_yaml(workspace):
    # The unclosed brace (line 12) is only noticed two lines on, at line 14.
    _fails(workspace, VALID.replace("  text_encoder: {}", "  text_encoder: {"), "bad.yaml:14", "invalid YAML")


def test_path_escaping_the_workspace(workspace, tmp_path):
    outside = tmp_path / "outside-model"
    outside.mkdir()
    text = VALID.replace("  synthetic: {preset: tiny-sd, seed: 0}", "  local: {path: ../../outside-model}")
    _fails(workspace, text, "bad.yaml:5", "model.local.path", "outside the workspace")


def test_unknown_preset_is_located(workspace):
    _fails(
        workspace,
        VALID.replace("preset: tiny-sd", "preset: huge-sd"),
        "bad.yaml:5",
        "model.synthetic.preset",
        "tiny-sd",
    )


def test_unreachable_hub_fails_in_one_located_line(workspace):
    text = VALID.replace(
        "  synthetic: {preset: tiny-sd, seed: 0}",
        "  hub: {id: stabilityai/stable-diffusion-2-1-base, revision: 5ede9e4bf3e3fd1cb0ef2f7a3fff13ee514fdf06}",
    )
    # A host name that can never resolve, so the test means the same on a machine with network.
    message = _fails(
        workspace,
        text,
        "bad.yaml:5",
        "model.hub.id",
        "cannot fetch the weights",
        env={"HF_ENDPOINT": "https://hub.invalid"},
    )
    assert message.count("error:") == 1


def test_malformed_yaml_reports_its_line(workspace):
    text = VALID.replace("latent_size: [16, 16]", "latent_size: [16, 16")
    _fails(workspace, text, "bad.yaml:7", "invalid YAML")
