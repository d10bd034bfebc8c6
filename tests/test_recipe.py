"""Recipe loading: valid recipes, sizes, extends, paths, cross-field rules, located errors, schema."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from builder.errors import RecipeError, RecipeErrors, UserError
from builder.recipe import (
    Attention,
    Component,
    DeploymentTarget,
    Family,
    Palettize,
    Recipe,
    load_recipe,
    recipe_json_schema,
)

FIXTURES = Path(__file__).parent / "fixtures" / "recipes"
COMMIT = "5ede9e4bf36e3e5b1ed8d8e7b9a1b5f0ef6c8d2a"

# Line numbers matter: tests below point at them.
SD = """\
name: tiny-sd
version: 0.1.0
family: sd
model:
  synthetic: {preset: tiny-sd, seed: 0}
latent_size: [16, 16]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS13
components:
  text_encoder: {}
  unet:
    compression: {mode: palettize, nbits: 6}
  vae_decoder: {compression: {mode: float16}}
"""

SDXL = f"""\
name: tiny-sdxl
version: 1.0.0-rc.1
family: sdxl
model:
  hub: {{id: stabilityai/stable-diffusion-xl-base-1.0, revision: {COMMIT}}}
  vae: {{hub: {{id: madebyollin/sdxl-vae-fp16-fix, revision: {COMMIT}}}}}
latent_size: [128, 128]
attention: SPLIT_EINSUM
compute_unit: CPU_AND_NE
deployment_target: iOS17
components:
  text_encoder: {{}}
  text_encoder_2: {{}}
  unet: {{}}
  vae_decoder: {{}}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def replace_line(text: str, start: str, new: str) -> str:
    """`text` with its line starting with `start` replaced by `new` (line numbers kept)."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(start))
    return "\n".join([*lines[:index], new, *lines[index + 1 :]]) + "\n"


def errors(tmp_path: Path, text: str, name: str = "r.yaml") -> list[RecipeError]:
    """The recipe errors `text` raises, one per problem."""
    with pytest.raises(UserError) as raised:
        load_recipe(write(tmp_path, name, text), tmp_path)
    error = raised.value
    assert isinstance(error, (RecipeError, RecipeErrors))
    return error.errors if isinstance(error, RecipeErrors) else [error]


def only_error(tmp_path: Path, text: str, name: str = "r.yaml") -> RecipeError:
    [error] = errors(tmp_path, text, name)
    return error


def assert_located(error: RecipeError, file: str, line: int, field: str) -> None:
    """The error names the file, line and field, in its attributes and its rendering."""
    assert (error.file, error.line, error.field) == (file, line, field)
    assert f"{file}:{line}: {field}: " in error.render()
    assert error.hint


# --- valid recipes -----------------------------------------------------------------------------


def test_valid_sd_recipe_loads(tmp_path: Path) -> None:
    loaded = load_recipe(write(tmp_path, "tiny-sd.yaml", SD), tmp_path)
    recipe = loaded.recipe
    assert recipe.name == "tiny-sd" and recipe.family is Family.SD
    assert recipe.model.synthetic is not None and recipe.model.synthetic.preset == "tiny-sd"
    assert recipe.latent_size == (16, 16) and recipe.image_size == (128, 128)
    assert recipe.unet_batch_size == 2 and recipe.chunk_unet is False
    assert recipe.components.unet.compression == Palettize(mode="palettize", nbits=6)
    assert recipe.components.text_encoder.compression.mode == "float16"
    assert list(recipe.components.enabled()) == [Component.TEXT_ENCODER, Component.UNET, Component.VAE_DECODER]
    assert loaded.path == tmp_path / "tiny-sd.yaml"
    assert loaded.files == (tmp_path / "tiny-sd.yaml",)
    assert loaded.origin("components.unet.compression.nbits") == "tiny-sd.yaml:13"
    assert loaded.origin("latent_size.1") == "tiny-sd.yaml:6"
    assert loaded.origin("chunk_unet") == "tiny-sd.yaml:1"  # a default: the top of the file


def test_fixture_recipe_loads() -> None:
    loaded = load_recipe(FIXTURES / "tiny-sd.yaml", FIXTURES)
    assert loaded.recipe.name == "tiny-sd"
    assert loaded.recipe.components.unet.compression.mode == "palettize"


def test_recipe_is_frozen(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", SD), tmp_path).recipe
    with pytest.raises(ValueError):
        recipe.name = "other"  # type: ignore[misc]


def test_recipe_can_be_built_without_a_file_and_pickled() -> None:
    """Later layers build recipes in code and send them to worker processes."""
    recipe = Recipe.model_validate(
        {
            "name": "direct",
            "version": "1.2.3",
            "family": "sd",
            "model": {"synthetic": {"preset": "tiny-sd"}},
            "image_size": [64, 64],
            "attention": "SPLIT_EINSUM",
            "compute_unit": "CPU_AND_NE",
            "deployment_target": "iOS16",
            "components": {"text_encoder": {}, "unet": {}, "vae_decoder": {}},
        }
    )
    assert recipe.latent_size == (8, 8)
    assert pickle.loads(pickle.dumps(recipe)) == recipe  # ok: round-trips our own object, no untrusted data


def test_loaded_strings_are_plain_str(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", SD), tmp_path).recipe
    assert type(recipe.name) is str and type(recipe.model.synthetic.preset) is str
    pickle.dumps(recipe)


def test_digest_ignores_formatting_and_comments_but_not_values(tmp_path: Path) -> None:
    reformatted = "# a comment\n" + SD.replace("{preset: tiny-sd, seed: 0}", "\n    preset: tiny-sd\n    seed: 0")
    digest = load_recipe(write(tmp_path, "a.yaml", SD), tmp_path).digest
    assert load_recipe(write(tmp_path, "b.yaml", reformatted), tmp_path).digest == digest
    changed = SD.replace("seed: 0", "seed: 1")
    assert load_recipe(write(tmp_path, "c.yaml", changed), tmp_path).digest != digest


def test_image_size_and_latent_size_are_the_same_recipe(tmp_path: Path) -> None:
    by_latents = load_recipe(write(tmp_path, "a.yaml", SD), tmp_path)
    by_pixels = load_recipe(
        write(tmp_path, "b.yaml", SD.replace("latent_size: [16, 16]", "image_size: [128, 128]")), tmp_path
    )
    assert by_pixels.recipe.latent_size == (16, 16)
    assert by_pixels.recipe.image_size == (128, 128)
    assert by_pixels.digest == by_latents.digest


def test_valid_sdxl_recipe_with_replacement_vae(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "xl.yaml", SDXL), tmp_path).recipe
    assert recipe.family is Family.SDXL
    assert recipe.model.hub.revision == COMMIT
    assert recipe.model.vae.hub.id == "madebyollin/sdxl-vae-fp16-fix"
    assert recipe.deployment_target is DeploymentTarget.IOS17
    assert Component.TEXT_ENCODER_2 in recipe.components.enabled()


def test_null_component_is_not_built(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", SD + "  vae_encoder: null\n"), tmp_path).recipe
    assert Component.VAE_ENCODER not in recipe.components.enabled()


# --- extends -----------------------------------------------------------------------------------


def test_extends_overrides_and_deep_merges(tmp_path: Path) -> None:
    write(tmp_path, "recipes/base.yaml", SD)
    child = write(
        tmp_path,
        "recipes/variant.yaml",
        """\
extends: base.yaml
name: tiny-sd-v2
latent_size: [64, 64]
attention: SPLIT_EINSUM_V2
components:
  unet:
    compression: {mode: palettize, nbits: 4}
  vae_encoder: {}
""",
    )
    loaded = load_recipe(child, tmp_path)
    recipe = loaded.recipe
    assert recipe.name == "tiny-sd-v2" and recipe.version == "0.1.0"
    assert recipe.latent_size == (64, 64) and recipe.attention is Attention.SPLIT_EINSUM_V2
    assert recipe.components.unet.compression.nbits == 4
    # merged key by key: the base's components survive next to the child's
    assert set(recipe.components.enabled()) == {
        Component.TEXT_ENCODER,
        Component.UNET,
        Component.VAE_DECODER,
        Component.VAE_ENCODER,
    }
    assert loaded.files == (child, tmp_path / "recipes/base.yaml")
    assert loaded.origin("components.unet.compression.nbits") == "recipes/variant.yaml:7"
    assert loaded.origin("components.text_encoder") == "recipes/base.yaml:11"
    assert loaded.origin("version") == "recipes/base.yaml:2"


def test_extends_replaces_lists_and_scalars_whole(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", SD.replace("latent_size: [16, 16]", "latent_size: [16, 16, 16]"))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nlatent_size: [8, 8]\n")
    assert load_recipe(child, tmp_path).recipe.latent_size == (8, 8)


def test_extends_chain_of_three(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SD)
    write(tmp_path, "b.yaml", "extends: a.yaml\nchunk_unet: true\n")
    loaded = load_recipe(write(tmp_path, "c.yaml", "extends: b.yaml\nname: c\n"), tmp_path)
    assert loaded.recipe.chunk_unet is True and loaded.recipe.name == "c"
    assert [f.name for f in loaded.files] == ["c.yaml", "b.yaml", "a.yaml"]


def test_error_in_base_points_at_the_base_file_line(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", replace_line(SD, "compute_unit:", "compute_unit: GPU"))
    error = only_error(tmp_path, "extends: base.yaml\nname: child\n", "child.yaml")
    assert_located(error, "base.yaml", 8, "compute_unit")
    assert "'CPU_AND_GPU'" in error.hint


def test_error_in_child_points_at_the_child_file_line(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", SD)
    error = only_error(tmp_path, "extends: base.yaml\nname: child\nunet_batch_size: 3\n", "child.yaml")
    assert_located(error, "child.yaml", 3, "unet_batch_size")


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "name: b\nextends: a.yaml\n")
    error = only_error(tmp_path, "extends: b.yaml\n", "a.yaml")
    assert_located(error, "b.yaml", 2, "extends")
    assert "a.yaml -> b.yaml -> a.yaml" in error.message


def test_extends_missing_base_lists_recipes(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", SD)
    error = only_error(tmp_path, "name: x\nextends: bsae.yaml\n", "child.yaml")
    assert_located(error, "child.yaml", 2, "extends")
    assert "did you mean 'base.yaml'?" in error.hint


def test_extends_outside_workspace_is_refused(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    write(tmp_path, "base.yaml", SD)
    with pytest.raises(RecipeError) as raised:
        load_recipe(write(workspace, "child.yaml", "extends: ../base.yaml\n"), workspace)
    assert_located(raised.value, "child.yaml", 1, "extends")
    assert "outside the workspace" in raised.value.message


def test_base_paths_resolve_against_the_base_file(tmp_path: Path) -> None:
    (tmp_path / "base/models/sd").mkdir(parents=True)
    write(tmp_path, "base/base.yaml", SD.replace("synthetic: {preset: tiny-sd, seed: 0}", "local: {path: models/sd}"))
    child = write(tmp_path, "variants/child.yaml", "extends: ../base/base.yaml\nname: child\n")
    assert load_recipe(child, tmp_path).recipe.model.local.path == tmp_path / "base/models/sd"


# --- local paths and the workspace --------------------------------------------------------------


def local_model(path: str) -> str:
    return SD.replace("synthetic: {preset: tiny-sd, seed: 0}", f"local: {{path: {path}}}")


def test_local_path_is_resolved_against_the_recipe_folder(tmp_path: Path) -> None:
    write(tmp_path, "models/sd.safetensors", "")
    recipe = load_recipe(write(tmp_path, "recipes/r.yaml", local_model("../models/sd.safetensors")), tmp_path).recipe
    assert recipe.model.local.path == tmp_path / "models/sd.safetensors"
    assert recipe.model.local.path.is_absolute()


def test_local_path_escaping_the_workspace_with_dotdot(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(RecipeError) as raised:
        load_recipe(write(workspace, "r.yaml", local_model("../elsewhere")), workspace)
    assert_located(raised.value, "r.yaml", 5, "model.local.path")
    assert "outside the workspace" in raised.value.message


def test_local_path_escaping_the_workspace_through_a_symlink(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (tmp_path / "elsewhere").mkdir()
    workspace.mkdir()
    (workspace / "models").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RecipeError) as raised:
        load_recipe(write(workspace, "r.yaml", local_model("models")), workspace)
    assert_located(raised.value, "r.yaml", 5, "model.local.path")
    assert str(tmp_path / "elsewhere") in raised.value.message


def test_local_path_must_exist(tmp_path: Path) -> None:
    error = only_error(tmp_path, local_model("models/nothing-here"))
    assert_located(error, "r.yaml", 5, "model.local.path")
    assert "does not exist" in error.message


def test_local_file_must_be_safetensors(tmp_path: Path) -> None:
    write(tmp_path, "model.ckpt", "")
    error = only_error(tmp_path, local_model("model.ckpt"))
    assert_located(error, "r.yaml", 5, "model.local.path")
    assert ".safetensors" in error.hint


def test_local_vae_path_is_checked_too(tmp_path: Path) -> None:
    (tmp_path / "models/sd").mkdir(parents=True)
    text = local_model("models/sd").replace("  local:", "  vae: {local: {path: ../vae}}\n  local:")
    error = only_error(tmp_path, text)
    assert_located(error, "r.yaml", 5, "model.vae.local.path")


# --- model sources -----------------------------------------------------------------------------


def test_hub_revision_must_be_a_pinned_commit(tmp_path: Path) -> None:
    text = SDXL.replace(
        f"stable-diffusion-xl-base-1.0, revision: {COMMIT}", "stable-diffusion-xl-base-1.0, revision: main"
    )
    error = only_error(tmp_path, text)
    assert_located(error, "r.yaml", 5, "model.hub.revision")
    assert "pin the commit" in error.hint and "40-hex" in error.hint


def test_hub_revision_is_required(tmp_path: Path) -> None:
    text = SDXL.replace(f", revision: {COMMIT}}}\n  vae", "}\n  vae")
    error = only_error(tmp_path, text)
    assert_located(error, "r.yaml", 5, "model.hub.revision")
    assert "add `revision:` under `model.hub`" in error.hint


def test_exactly_one_model_source(tmp_path: Path) -> None:
    text = SD.replace("  synthetic:", f"  hub: {{id: a/b, revision: {COMMIT}}}\n  synthetic:")
    error = only_error(tmp_path, text)
    assert_located(error, "r.yaml", 6, "model.synthetic")
    assert "exactly one" in error.message


def test_no_model_source(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("  synthetic: {preset: tiny-sd, seed: 0}", "  {}"))
    assert_located(error, "r.yaml", 4, "model")


# --- sizes and attention -------------------------------------------------------------------------


def test_latent_and_image_size_together_are_refused(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]", "latent_size: [16, 16]\nimage_size: [128, 128]"))
    assert_located(error, "r.yaml", 7, "image_size")


def test_a_size_is_required(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]\n", ""))
    assert_located(error, "r.yaml", 1, "latent_size")


def test_image_size_must_be_a_multiple_of_8(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]", "image_size: [100, 128]"))
    assert_located(error, "r.yaml", 6, "image_size")
    assert "multiple of 8" in error.message and "[64, 128]" in error.hint and "[128, 128]" in error.hint


def test_latent_size_must_be_a_multiple_of_8(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]", "latent_size: [12, 16]"))
    assert_located(error, "r.yaml", 6, "latent_size")
    assert "[8, 16] or [16, 16]" in error.hint


def test_image_size_whose_latents_are_not_multiples_of_8(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]", "image_size: [72, 128]"))
    assert_located(error, "r.yaml", 6, "image_size")
    assert "[9, 16]" in error.message


def test_latent_size_must_be_positive(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]", "latent_size: [0, 16]"))
    assert_located(error, "r.yaml", 6, "latent_size.0")


def split_einsum_v2(size_line: str) -> str:
    return SD.replace("latent_size: [16, 16]", size_line).replace("attention: ORIGINAL", "attention: SPLIT_EINSUM_V2")


def test_split_einsum_v2_refuses_sequences_it_would_truncate(tmp_path: Path) -> None:
    error = only_error(tmp_path, split_einsum_v2("latent_size: [48, 48]"))
    assert_located(error, "r.yaml", 6, "latent_size")
    assert "level 0 has length 2304" in error.message and "level 1 has length 576" in error.message
    assert "level 2" not in error.message
    assert "[64, 64]" in error.hint or "[32, 32]" in error.hint


def test_split_einsum_v2_suggestions_work(tmp_path: Path) -> None:
    hint = only_error(tmp_path, split_einsum_v2("latent_size: [48, 48]")).hint
    suggested = hint.split("set latent_size to ")[1].split(" (sizes")[0].split(" or ")
    assert len(suggested) == 3
    for index, size in enumerate(suggested):
        load_recipe(write(tmp_path, f"s{index}.yaml", split_einsum_v2(f"latent_size: {size}")), tmp_path)


def test_split_einsum_v2_error_speaks_in_image_pixels_when_image_size_was_written(tmp_path: Path) -> None:
    error = only_error(tmp_path, split_einsum_v2("image_size: [384, 384]"))
    assert_located(error, "r.yaml", 6, "image_size")
    assert "[512, 512]" in error.hint or "[256, 256]" in error.hint


@pytest.mark.parametrize("size", ["[64, 64]", "[16, 16]", "[96, 64]", "[128, 128]"])
def test_split_einsum_v2_accepts_aligned_sizes(tmp_path: Path, size: str) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", split_einsum_v2(f"latent_size: {size}")), tmp_path).recipe
    assert recipe.attention is Attention.SPLIT_EINSUM_V2


def test_other_attentions_accept_any_multiple_of_8(tmp_path: Path) -> None:
    load_recipe(write(tmp_path, "r.yaml", SD.replace("[16, 16]", "[48, 48]")), tmp_path)


# --- family rules ------------------------------------------------------------------------------


def test_sdxl_rules_report_every_violation(tmp_path: Path) -> None:
    text = replace_line(SDXL, "deployment_target:", "deployment_target: macOS13")
    text = text.replace("  text_encoder_2: {}\n", "  safety_checker: {}\n") + "unet_batch_size: 1\n"
    found = {e.field: e for e in errors(tmp_path, text)}
    assert set(found) == {
        "unet_batch_size",
        "deployment_target",
        "components.safety_checker",
        "components.text_encoder_2",
    }
    assert_located(found["unet_batch_size"], "r.yaml", 16, "unet_batch_size")
    assert_located(found["deployment_target"], "r.yaml", 10, "deployment_target")
    assert_located(found["components.safety_checker"], "r.yaml", 13, "components.safety_checker")
    assert_located(found["components.text_encoder_2"], "r.yaml", 11, "components.text_encoder_2")
    assert "macOS14" in found["deployment_target"].hint


def test_sdxl_may_omit_the_first_text_encoder(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "r.yaml", SDXL.replace("  text_encoder: {}\n", "")), tmp_path).recipe
    assert Component.TEXT_ENCODER not in recipe.components.enabled()


def test_sd_refuses_a_second_text_encoder_and_needs_the_first(tmp_path: Path) -> None:
    text = SD.replace("  text_encoder: {}", "  text_encoder_2: {}")
    found = {e.field: e for e in errors(tmp_path, text)}
    assert set(found) == {"components.text_encoder", "components.text_encoder_2"}
    assert_located(found["components.text_encoder_2"], "r.yaml", 11, "components.text_encoder_2")
    assert_located(found["components.text_encoder"], "r.yaml", 10, "components.text_encoder")


def test_unet_and_vae_decoder_are_required(tmp_path: Path) -> None:
    text = SD.replace("  vae_decoder: {compression: {mode: float16}}\n", "")
    error = only_error(tmp_path, text)
    assert_located(error, "r.yaml", 10, "components.vae_decoder")


# --- field errors ------------------------------------------------------------------------------


def test_unknown_field_suggests_the_closest_name(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("chunk_unet", "x") + "chunk_unt: true\n")
    assert_located(error, "r.yaml", 15, "chunk_unt")
    assert "did you mean 'chunk_unet'?" in error.hint


def test_unknown_nested_field_suggests_within_its_tagged_mapping(tmp_path: Path) -> None:
    text = SD.replace("{mode: palettize, nbits: 6}", "{mode: palettize, nbit: 6}")
    found = {e.field: e for e in errors(tmp_path, text)}
    unknown, missing = found["components.unet.compression.nbit"], found["components.unet.compression.nbits"]
    assert_located(unknown, "r.yaml", 13, "components.unet.compression.nbit")
    assert unknown.hint == "remove it; did you mean 'nbits'?"
    assert_located(missing, "r.yaml", 13, "components.unet.compression.nbits")
    assert "add `nbits:` under `components.unet.compression`" in missing.hint


def test_unknown_field_without_a_close_name_lists_the_allowed_ones(tmp_path: Path) -> None:
    error = only_error(
        tmp_path, SD.replace("  synthetic: {preset: tiny-sd, seed: 0}", "  synthetic: {preset: tiny-sd, zzz: 0}")
    )
    assert_located(error, "r.yaml", 5, "model.synthetic.zzz")
    assert error.hint == "remove it; allowed here: preset, seed"


def test_wrong_enum_value_lists_the_choices(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("attention: ORIGINAL", "attention: FLASH"))
    assert_located(error, "r.yaml", 7, "attention")
    assert "'FLASH'" in error.message
    assert "'ORIGINAL', 'SPLIT_EINSUM' or 'SPLIT_EINSUM_V2'" in error.hint


def test_nbits_5_is_refused(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("nbits: 6", "nbits: 5"))
    assert_located(error, "r.yaml", 13, "components.unet.compression.nbits")
    assert "nbits must be one of: 1, 2, 3, 4, 6 or 8" in error.hint


def test_unknown_compression_mode_lists_the_modes(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("{mode: float16}", "{mode: int4}"))
    assert_located(error, "r.yaml", 14, "components.vae_decoder.compression")
    assert "'float16', 'palettize'" in error.hint


def test_compression_without_mode(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("{mode: float16}", "{nbits: 4}"))
    assert_located(error, "r.yaml", 14, "components.vae_decoder.compression")
    assert "add `mode:`" in error.hint and "'palettize'" in error.hint


def test_unquoted_number_for_text_field(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("version: 0.1.0", "version: 1.0"))
    assert_located(error, "r.yaml", 2, "version")
    assert "quote" in error.hint


def test_several_problems_are_reported_together_in_line_order(tmp_path: Path) -> None:
    text = (
        SD.replace("family: sd", "family: sd4").replace("nbits: 6", "nbits: 5").replace("name: tiny-sd", "name: Tiny")
    )
    found = errors(tmp_path, text)
    assert [(e.line, e.field) for e in found] == [
        (1, "name"),
        (3, "family"),
        (13, "components.unet.compression.nbits"),
    ]
    with pytest.raises(RecipeErrors) as raised:
        load_recipe(tmp_path / "r.yaml", tmp_path)
    rendered = raised.value.render()
    assert rendered.count("error: r.yaml:") == 3 and "Traceback" not in rendered


# --- YAML problems -----------------------------------------------------------------------------


def test_missing_recipe_file_lists_available_recipes(tmp_path: Path) -> None:
    write(tmp_path, "recipes/tiny-sd.yaml", SD)
    write(tmp_path, "recipes/big.yaml", SD)
    with pytest.raises(RecipeError) as raised:
        load_recipe(tmp_path / "recipes/tiny_sd.yaml", tmp_path)
    error = raised.value
    assert error.file == "recipes/tiny_sd.yaml" and "not found" in error.message
    assert "did you mean 'tiny-sd.yaml'?" in error.hint and "big.yaml, tiny-sd.yaml" in error.hint


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD.replace("latent_size: [16, 16]", "latent_size: [16, 16"))
    assert (error.file, error.line) == ("r.yaml", 7)
    assert "invalid YAML" in error.message and "r.yaml:7:" in error.render()
    assert "indentation" in error.hint


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    error = only_error(tmp_path, SD + "  unet: {}\n")
    assert_located(error, "r.yaml", 15, "components.unet")
    assert "first written at line 12" in error.message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    error = only_error(tmp_path, "- name: tiny-sd\n")
    assert (error.file, error.line) == ("r.yaml", 1) and "mapping" in error.message


def test_empty_recipe(tmp_path: Path) -> None:
    error = only_error(tmp_path, "# nothing yet\n")
    assert "empty" in error.message


def test_yaml_merge_keys_point_to_extends(tmp_path: Path) -> None:
    error = only_error(tmp_path, "base: &b {name: x}\nother:\n  <<: *b\n")
    assert (error.line, error.field) == (3, "other")
    assert "extends" in error.hint


def test_file_outside_workspace_is_named_by_its_full_path(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", SD.replace("family: sd", "family: sd4"))
    with pytest.raises(RecipeError) as raised:
        load_recipe(path, tmp_path / "elsewhere")
    assert raised.value.file == str(path)


# --- JSON schema -------------------------------------------------------------------------------


def test_schema_is_json_and_lists_enums_and_modes() -> None:
    schema = json.loads(json.dumps(recipe_json_schema()))
    defs = schema["$defs"]
    assert defs["Attention"]["enum"] == ["ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2"]
    assert defs["ComputeUnit"]["enum"] == ["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"]
    assert defs["DeploymentTarget"]["enum"] == ["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"]
    assert defs["Family"]["enum"] == ["sd", "sdxl", "sd3"]
    assert defs["Palettize"]["properties"]["nbits"]["enum"] == [1, 2, 3, 4, 6, 8]
    compression = defs["ComponentSettings"]["properties"]["compression"]
    assert set(compression["discriminator"]["mapping"]) == {"float16", "palettize", "quantize", "mixed", "w8a8"}
    assert {"latent_size", "image_size", "extends"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    assert "name" in schema["else"]["required"] and schema["if"] == {"required": ["extends"]}


def test_schema_describes_every_field() -> None:
    schema = recipe_json_schema()
    models = [schema, *(d for d in schema["$defs"].values() if "properties" in d)]
    for model in models:
        assert model.get("description"), model["title"]
        for name, field in model["properties"].items():
            # pydantic leaves out a field description equal to its model's, which the $ref carries
            referenced = schema["$defs"][field["$ref"].split("/")[-1]] if "$ref" in field else {}
            assert field.get("description") or referenced.get("description"), f"{model['title']}.{name}"
