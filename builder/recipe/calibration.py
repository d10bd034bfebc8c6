"""The prompts compression is calibrated and judged with.

Calibration (W8A8): the denoising trajectories of these prompts give the UNet's activation ranges.
`calibration: {prompts: N}` takes the first N built-in prompts; a list takes the user's own. They are
varied on purpose (photographs, paintings, renders, close-ups, landscapes), since an activation range
is only as wide as what calibration showed it.

Judging (the analysis workload of `sdbuild analyze` and of W8A8's per-layer sensitivity): short
trajectories of `WORKLOAD_PROMPTS`, kept apart from the calibration prompts as Apple keeps its test
prompts apart from its calibration set. The first two are the mixed-bit analysis's workload.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Le, MaxLen, MinLen
from pydantic import Field, StringConstraints

from .base import RecipeModel
from .strict import ExactPositiveInt, Seed

BUILT_IN_PROMPTS: tuple[str, ...] = (
    "a red fox curled up asleep in fresh snow, soft morning light, wildlife photograph",
    "the interior of a quiet library with tall wooden shelves and a spiral staircase, warm lamps",
    "an oil painting of fishing boats in a small harbour at sunset, thick brush strokes",
    "a macro photograph of dew drops on a green leaf, shallow depth of field",
    "a futuristic city skyline at night with glowing towers and flying cars, digital art",
    "a bowl of ramen with a soft-boiled egg and spring onions, overhead food photograph",
    "a pencil sketch of an old man with a beard reading a newspaper",
    "snow-capped mountains reflected in a still alpine lake, wide angle landscape photograph",
    "a cozy cabin in a pine forest with smoke rising from the chimney, watercolor",
    "a vintage red bicycle leaning against a blue wooden door, street photograph",
    "an astronaut floating above the earth, highly detailed 3D render",
    "a field of sunflowers under a stormy sky, dramatic lighting",
    "a close-up portrait of a tabby cat with green eyes, studio lighting",
    "a medieval stone bridge over a river in autumn, fallen leaves, misty morning",
    "an isometric illustration of a tiny island with a lighthouse and palm trees",
    "a plate of colourful macarons on a marble table, pastel tones, product photograph",
)

WORKLOAD_PROMPTS: tuple[str, ...] = (
    "a photo of a red bicycle leaning on a wall",
    "a watercolor of a lighthouse at dusk",
    "a bowl of oranges on a wooden kitchen table",
    "a black dog running across a green meadow",
    "a steam train crossing a stone viaduct in the hills",
    "a bouquet of white tulips in a glass vase",
    "a narrow street of an old town at night, wet cobblestones",
    "a hot air balloon over a desert canyon",
)

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class Calibration(RecipeModel):
    """Where W8A8 activation ranges come from: UNet inputs recorded along guided denoising
    trajectories of these prompts, through the model's own text encoder and scheduler."""

    prompts: (
        Annotated[ExactPositiveInt, Le(len(BUILT_IN_PROMPTS))]
        | Annotated[list[Prompt], MinLen(1), MaxLen(len(BUILT_IN_PROMPTS) * 4)]
    ) = Field(
        default=8,
        description=f"A count of built-in calibration prompts (1 to {len(BUILT_IN_PROMPTS)}), or a list of your own.",
    )
    steps: Annotated[ExactPositiveInt, Le(1000)] = Field(
        default=10,
        description="Denoising steps per prompt; every step's UNet input is one calibration sample (batch 2: "
        "unconditional and conditional).",
    )
    seed: Seed = Field(default=0, description="Seed of each prompt's initial latents.")

    def prompt_list(self) -> list[str]:
        """The prompts themselves: the first `prompts` built-in ones, or the list as written."""
        return list(BUILT_IN_PROMPTS[: self.prompts]) if isinstance(self.prompts, int) else list(self.prompts)


class Workload(RecipeModel):
    """The short guided trajectories each layer's quantization is judged on (final latents against
    float16), from seeded latents."""

    prompts: Annotated[ExactPositiveInt, Le(len(WORKLOAD_PROMPTS))] = Field(
        default=2, description=f"How many of the {len(WORKLOAD_PROMPTS)} built-in workload prompts to run."
    )
    steps: Annotated[ExactPositiveInt, Le(1000)] = Field(
        default=2, description="Denoising steps per trajectory; each layer costs about this many UNet calls."
    )
