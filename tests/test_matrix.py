"""Recipe matrices: expansion and its located errors, one graph for every variant (shared stages run
once), a folder of recipes built together, and `sdbuild status`."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import RecipeError, RecipeErrors
from builder.recipe import load_recipe, load_recipes

PROJECT = Path(__file__).resolve().parents[1]
MATRIX = (PROJECT / "recipes" / "tiny-sd-matrix.yaml").read_text()
NAMES = ["ORIGINAL-6bit", "ORIGINAL-4bit", "SPLIT_EINSUM-6bit", "SPLIT_EINSUM-4bit"]


def _cli(root: Path, *args: str) -> tuple[int, str, str]:
    """`sdbuild` in this process: exit status, stdout, stderr; an escaping exception fails the test."""
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["--workspace", str(root), "--cache-dir", str(root / "cache"), *args])
    return code, out.getvalue(), err.getvalue()


def _write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _line(text: str, needle: str) -> int:
    """The 1-based line of the first line containing `needle`."""
    return next(number for number, line in enumerate(text.splitlines(), 1) if needle in line)


def test_the_matrix_expands_into_validated_variants(tmp_path):
    variants = load_recipes(_write(tmp_path, MATRIX), tmp_path)
    assert [v.variant.name for v in variants if v.variant] == NAMES
    by_name = {v.variant.name: v for v in variants if v.variant}
    einsum4 = by_name["SPLIT_EINSUM-4bit"]
    assert einsum4.recipe.attention.value == "SPLIT_EINSUM"
    assert einsum4.recipe.components.unet.compression.nbits == 4
    assert einsum4.variant.settings == {"attention": "SPLIT_EINSUM", "components.unet.compression.nbits": 4}
    assert einsum4.target == "tiny-sd-matrix.SPLIT_EINSUM-4bit"
    assert len({v.digest for v in variants}) == 4
    # A value the matrix set is located at its list item, like any other recipe value.
    assert einsum4.origin("components.unet.compression.nbits").endswith(f":{_line(MATRIX, 'nbits: [6, 4]')}")


def test_a_whole_mapping_can_vary_and_names_its_variant_by_its_values(tmp_path):
    text = MATRIX.replace(
        "  components.unet.compression.nbits: [6, 4]",
        "  chunk_unet: [false]\n"
        "  components.unet.compression:\n    - {mode: float16}\n    - {mode: palettize, nbits: 4}",
    ).replace("{attention}-{nbits}bit", "{attention}-{compression}-{chunk_unet}")
    variants = load_recipes(_write(tmp_path, text), tmp_path)
    assert [v.variant.name for v in variants if v.variant][:2] == [
        "ORIGINAL-float16-false",
        "ORIGINAL-palettize-4-false",
    ]
    assert variants[1].recipe.components.unet.compression.nbits == 4
    assert variants[1].origin("components.unet.compression.nbits").endswith(f":{_line(text, 'nbits: 4}')}")


def _refused(tmp_path: Path, text: str) -> list[RecipeError]:
    with pytest.raises((RecipeError, RecipeErrors)) as raised:
        load_recipes(_write(tmp_path, text), tmp_path)
    error = raised.value
    return error.errors if isinstance(error, RecipeErrors) else [error]


def test_a_bad_list_item_is_reported_once_at_its_line(tmp_path):
    text = MATRIX.replace("nbits: [6, 4]", "nbits:\n    - 6\n    - 5")
    [error] = _refused(tmp_path, text)  # two variants carry the 5, one error
    assert (error.line, error.field) == (_line(text, "- 5"), "components.unet.compression.nbits")
    assert "6" in (error.hint or "")


def test_a_bad_enum_item_names_the_choices(tmp_path):
    text = MATRIX.replace("[ORIGINAL, SPLIT_EINSUM]", "[ORIGINAL, SPLIT_EINSUMS]")
    [error] = _refused(tmp_path, text)
    assert (error.line, error.field) == (_line(text, "attention: ["), "attention")
    assert "SPLIT_EINSUM_V2" in (error.hint or "")


@pytest.mark.parametrize(
    ("edit", "replacement", "at", "field", "words"),
    [
        ("{attention}-{nbits}bit", "{attention}", "variant_name", "variant_name", "two variants the name"),
        ("{attention}-{nbits}bit", "{attention}-{bits}", "variant_name", "variant_name", "{bits}"),
        ("{attention}-{nbits}bit", "../{attention}", "variant_name", "variant_name", "cannot be a folder name"),
        ("{attention}-{nbits}bit", "{attention}-{nbits", "variant_name", "variant_name", "unmatched brace"),
        ("  attention: [", "  version: [0.2.0]\n  attention: [", "version: [", "matrix.version", "cannot vary"),
        (
            "  attention: [",
            "  components.unet: [{}]\n  attention: [",
            "nbits: [",
            "matrix.components.unet.compression.nbits",
            "overlaps",
        ),
        ("[ORIGINAL, SPLIT_EINSUM]", "[]", "attention: [", "matrix.attention", "at least one value"),
        ("[ORIGINAL, SPLIT_EINSUM]", "ORIGINAL", "attention: ORIGINAL", "matrix.attention", "list"),
        ("matrix:", "attention: ORIGINAL\nunused:", "variant_name", "variant_name", "no `matrix:`"),
    ],
)
def test_matrix_mistakes_are_located(tmp_path, edit, replacement, at, field, words):
    text = MATRIX.replace(edit, replacement)
    [error] = _refused(tmp_path, text)
    assert (error.line, error.field) == (_line(text, at), field)
    assert words in error.message and error.hint


def test_an_unknown_setting_is_an_unknown_field_at_the_matrix_line(tmp_path):
    text = MATRIX.replace("components.unet.compression.nbits", "components.unet.compresion.nbits")
    errors = _refused(tmp_path, text)
    assert any(e.line == _line(text, "compresion") and "compresion" in e.message for e in errors)


def test_commands_taking_one_bundle_refuse_a_matrix(tmp_path):
    with pytest.raises(RecipeError) as raised:
        load_recipe(_write(tmp_path, MATRIX), tmp_path)
    assert raised.value.line == _line(MATRIX, "matrix:") and "sdbuild build" in (raised.value.hint or "")
    code, _, err = _cli(tmp_path, "plan", str(tmp_path / "m.yaml"))
    assert code == 2 and "matrix" in err and "Traceback" not in err


def test_recipes_of_a_folder_may_not_publish_into_one_folder(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(PROJECT / "recipes" / "tiny-sd.yaml", recipes / "a.yaml")
    shutil.copy(PROJECT / "recipes" / "tiny-sd.yaml", recipes / "b.yaml")
    code, _, err = _cli(tmp_path, "build", str(recipes))
    assert code == 2 and "b.yaml" in err and "own name" in err
    assert not (tmp_path / "cache" / "objects").exists()


@pytest.fixture(scope="module")
def matrix_build(tmp_path_factory) -> tuple[Path, dict]:
    """The 4-variant tiny-sd matrix built cold in one graph, in a workspace of its own."""
    root = tmp_path_factory.mktemp("matrix")
    (root / "recipes").mkdir()
    shutil.copy(PROJECT / "recipes" / "tiny-sd-matrix.yaml", root / "recipes")
    code, out, err = _cli(root, "build", str(root / "recipes" / "tiny-sd-matrix.yaml"), "--json")
    assert code == 0, err
    return root, json.loads(out)


def _built(report: dict, stage_id: str) -> list[dict]:
    return [s for s in report["stages"] if s["stage_id"] == stage_id and s["status"] == "built"]


@pytest.mark.slow  # the module's one cold 4-variant build (about two CPU minutes)
def test_shared_stages_run_once(matrix_build):
    _, report = matrix_build
    assert report["stages_in_graph"] == len(report["stages"])
    for shared in (
        "source",
        "rewrite:text_encoder",
        "convert:text_encoder",
        "rewrite:vae_decoder",
        "convert:vae_decoder",
    ):
        assert len(_built(report, shared)) == 1, shared
        assert sum(s["stage_id"] == shared for s in report["stages"]) == 4, shared
    for per_attention in ("rewrite:unet", "trace:unet", "convert:unet"):
        variants = {s["variant"].split("-")[0] for s in _built(report, per_attention)}
        assert variants == {"ORIGINAL", "SPLIT_EINSUM"}, per_attention
    for per_variant in ("palettize:unet", "verify:unet", "bundle"):
        assert len(_built(report, per_variant)) == 4, per_variant
    # Equal keys gave equal outputs: every variant's hit points at the shared stage's output.
    sources = {s["digest"] for s in report["stages"] if s["stage_id"] == "source"}
    assert len(sources) == 1
    assert report["stages_built"] == sum(s["status"] == "built" for s in report["stages"]) < report["stages_in_graph"]


@pytest.mark.slow  # the module's one cold 4-variant build (about two CPU minutes)
def test_each_variant_is_published_with_its_settings(matrix_build):
    root, report = matrix_build
    for entry in report["bundles"]:
        folder = root / "artifacts" / "tiny-sd-matrix" / "0.1.0" / entry["variant"]
        assert entry["bundle"] == str(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["variant"] == {"name": entry["variant"], "settings": entry["settings"]}
        assert manifest["attention"] == entry["settings"]["attention"]
        assert (
            manifest["models"]["Unet"]["compression"]["nbits"] == entry["settings"]["components.unet.compression.nbits"]
        )
        assert (folder / "Resources" / "Unet.mlpackage").is_dir()
    assert (
        root / "artifacts" / "tiny-sd-matrix" / "latest"
    ).resolve() == root / "artifacts" / "tiny-sd-matrix" / "0.1.0"
    indexes = {p.stem for p in (root / "cache" / "index").glob("*.json")}
    assert indexes == {f"tiny-sd-matrix.{name}" for name in NAMES}  # the set's own index is split back


def _status(root: Path, *args: str) -> dict[str, dict]:
    code, out, err = _cli(root, "status", *args, "--json")
    assert code == 0, err
    return {f"{row['recipe']}/{row['variant']}": row for row in json.loads(out)}


@pytest.mark.slow  # the module's one cold 4-variant build (about two CPU minutes)
def test_status_then_a_folder_build_sharing_every_stage_but_the_bundle(matrix_build):
    root, _ = matrix_build
    recipes = root / "recipes"
    # A plain recipe equal to one variant: built with the folder, only its bundle is new work.
    plain = MATRIX.split("matrix:")[0].replace("tiny-sd-matrix", "tiny-sd-plain") + "attention: ORIGINAL\n"
    (recipes / "tiny-sd-plain.yaml").write_text(plain)
    rows = _status(root)  # default: <workspace>/recipes
    assert {k: r["status"] for k, r in rows.items()} == {
        **{f"tiny-sd-matrix/{name}": "built" for name in NAMES},
        "tiny-sd-plain/None": "never built",
    }
    code, out, err = _cli(root, "build", str(recipes), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(s["recipe"], s["stage_id"]) for s in report["stages"] if s["status"] == "built"] == [
        ("tiny-sd-plain", "bundle")
    ]
    assert all(r["status"] == "built" for r in _status(root, str(recipes)).values())

    # An edit to every variant: stale, with the setting that changed.
    edited = MATRIX.replace("compute_unit: CPU_AND_GPU", "compute_unit: CPU_AND_NE")
    (recipes / "tiny-sd-matrix.yaml").write_text(edited)
    try:
        rows = _status(root, str(recipes / "tiny-sd-matrix.yaml"))
    finally:
        (recipes / "tiny-sd-matrix.yaml").write_text(MATRIX)
    for name in NAMES:
        row = rows[f"tiny-sd-matrix/{name}"]
        assert row["status"] == "stale"
        assert row["reason"].startswith("bundle: params.compute_unit changed") and "CPU_AND_NE" in row["reason"]
    code, _, err = _cli(root, "status", str(recipes))
    assert code == 0 and "SPLIT_EINSUM-4bit" in err and "built" in err
