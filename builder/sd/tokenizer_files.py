"""A CLIP-format byte-level BPE tokenizer generated on the spot.

Tests and the default build use tiny Stable Diffusion pipelines with seeded random weights, and
no model hub is reachable, so the tokenizer cannot be downloaded. This module learns a small set
of BPE merges from a built-in corpus of image-prompt English and writes `vocab.json` and
`merges.txt` laid out exactly like OpenAI CLIP's, so `transformers.CLIPTokenizer`, diffusers and
the Swift StableDiffusion package all read them as they read the real ones.

The output is a pure function of `merges`: the same bytes on every call and every machine, which
keeps build caches keyed on file hashes stable.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Prompt-like English. Word frequencies in this text decide which merges are learnt first, so
# the short function words and the stock prompt phrases come out as single tokens.
_CORPUS = """
a photo of an astronaut riding a horse on mars
a photo of a cat sitting on a chair
a photo of a dog running in the park
a painting of a cat wearing a hat
a painting of a castle on a hill at sunset
a portrait of a woman with red hair
a portrait of an old man with a beard
a close up photo of a red rose in the rain
a cute little puppy playing in the snow
a beautiful landscape with mountains and a lake
a futuristic city at night with neon lights
a cozy cabin in the woods in winter
an oil painting of a ship in a storm
an illustration of a dragon flying over a village
a watercolor painting of a fox in the forest
a digital art of a robot in a garden
a sketch of a girl reading a book
a high quality photo of a bowl of fruit on a wooden table
a cinematic shot of a car driving through the desert
a fantasy castle floating in the sky
a bear fishing in a river
an owl sitting on a branch under the moon
a lighthouse on a rocky coast at dawn
a bird flying over the ocean
a tiger walking through the jungle
a small house by the sea
the sun rising over the mountains
a train crossing a bridge over a river
a teddy bear on a skateboard in times square
a bowl of soup that looks like a monster
a panda eating bamboo
an elephant in the savanna
a horse in a field of flowers
a knight in shining armor
a wizard casting a spell
a cup of coffee on a desk next to a laptop
a vase of sunflowers by the window
a street in paris in the rain
a market in tokyo at night
a snowy village in the mountains
a waterfall in a tropical forest
a pirate ship sailing on the sea
a spaceship landing on the moon
a man and a woman walking on the beach
children playing in a playground
a family having dinner together
a chef cooking in a kitchen
a musician playing the guitar on stage
a dancer in a red dress
a soldier standing in the rain
a king sitting on a throne
a queen wearing a golden crown
a boy and his dog
a girl with a balloon
an astronaut floating in space
a planet with rings and many moons
a galaxy full of stars
a cat and a dog sleeping together
trending on artstation, highly detailed, sharp focus, 8k, 4k, hd
masterpiece, best quality, ultra realistic, photorealistic, hyperrealistic
concept art, matte painting, octane render, unreal engine, volumetric lighting
studio lighting, soft light, golden hour, dramatic lighting, rim light, backlit
depth of field, bokeh, wide angle, telephoto, macro, long exposure, tilt shift
by greg rutkowski, by alphonse mucha, by claude monet, by vincent van gogh
in the style of pixar, in the style of studio ghibli, anime style, cartoon style
oil on canvas, acrylic, pastel, charcoal, ink, pencil drawing, line art
pixel art, low poly, isometric, vector art, flat design, minimalist, abstract
surreal, impressionism, expressionism, cubism, pop art, art nouveau, art deco
baroque, renaissance, gothic, victorian, medieval, ancient, modern, futuristic
cyberpunk, steampunk, fantasy, science fiction, horror, dark, moody, bright
colorful, vibrant, pastel colors, muted colors, black and white, monochrome, sepia
red orange yellow green blue purple pink brown black white gray grey gold silver
cyan magenta teal turquoise violet indigo crimson scarlet maroon beige ivory
cat dog horse cow pig sheep goat chicken duck goose rabbit mouse rat hamster
lion tiger bear wolf fox deer moose elk zebra giraffe elephant rhino hippo
monkey gorilla panda koala kangaroo camel llama alpaca squirrel raccoon otter
eagle hawk owl parrot penguin flamingo swan crow sparrow pigeon peacock
fish shark whale dolphin octopus jellyfish turtle frog snake lizard crocodile
butterfly bee spider ant beetle dragonfly ladybug snail crab lobster starfish
dragon unicorn phoenix griffin mermaid fairy elf dwarf goblin troll giant ghost
man woman boy girl child baby person people king queen prince princess knight
warrior wizard witch soldier pilot doctor nurse teacher student farmer chef
robot cyborg android alien monster zombie vampire skeleton angel demon god
tree trees forest flower flowers grass leaf leaves rose tulip daisy lily lotus
mountain mountains hill hills valley river lake sea ocean beach island desert
sky cloud clouds sun moon star stars rain snow storm wind fog mist thunder
city town village street road bridge building house castle tower temple church
room kitchen bedroom library garden park field farm cave ruins palace station
car truck bus train plane boat ship bicycle motorcycle rocket spaceship tank
table chair bed sofa lamp window door mirror clock book books cup bowl plate
apple banana orange cherry strawberry grape lemon pizza burger cake bread cheese
hat shirt dress coat jacket shoes boots scarf gloves glasses crown armor sword
morning noon afternoon evening night dawn dusk sunrise sunset midnight twilight
spring summer autumn fall winter season weather sunny cloudy rainy snowy foggy
big small tiny huge giant little tall short long wide old young new ancient
happy sad angry calm peaceful lonely scary cute beautiful ugly elegant majestic
standing sitting walking running flying swimming jumping dancing sleeping eating
reading writing painting singing playing fighting riding driving looking smiling
wearing holding carrying watching waiting falling floating burning glowing shining
the a an of in on at by with from to for and or but over under above below near
inside outside behind between through across around into onto up down out off
is are was were be been being has have had do does did will would can could
this that these those it its his her their our your my one two three four five
very more most much many some any all no not only also just still even so than
made covered filled surrounded lit shot taken seen drawn painted rendered
photograph photography picture image render illustration drawing poster cover
wallpaper icon logo sticker tattoo sculpture statue mural comic manga animation
portrait landscape closeup close shot view scene background foreground detail
light lights lighting shadow shadows reflection reflections color colors texture
water fire ice stone rock wood metal glass gold silver crystal paper fabric sand
smoke steam dust sparks flames lightning rainbow aurora nebula galaxy planet
camera lens canon nikon sony kodak film analog polaroid grain vintage retro
cinematic epic dramatic atmospheric ethereal dreamy magical mystical whimsical
realistic detailed intricate ornate smooth soft sharp clean simple complex
hdr uhd dslr raw professional award winning stunning gorgeous amazing incredible
perfect lighting perfect composition rule of thirds symmetrical centered
hyper detailed extremely detailed fine details insanely detailed highly intricate
trending on pinterest featured on behance dribbble deviantart cgsociety
a dog sitting on the grass in the sun
a red car parked on a street in the city
a blue bird sitting on a tree branch
a green frog on a lily pad in a pond
a yellow flower in a field of grass
a white horse running on the beach at sunset
a black cat on a window sill at night
a brown bear in the forest in autumn
a group of people standing in front of a building
a person holding an umbrella in the rain
an old woman knitting by the fireplace
a young man playing basketball
a little girl with a teddy bear
two cats playing with a ball of yarn
three dogs running on the beach
a bowl of ramen with chopsticks
a slice of cake on a plate
a glass of wine on a table
a city skyline at night with fireworks
a mountain lake reflecting the sky
an abandoned building overgrown with plants
a steam locomotive in the snow
a hot air balloon over the countryside
a submarine deep under the sea
a coral reef with tropical fish
a jungle temple covered in vines
a windmill in a tulip field
a medieval market with merchants
a spaceship in orbit around a planet
a portrait photo of a smiling woman, natural light, 85mm
a photo of a golden retriever puppy, studio portrait
a photo of a delicious burger with fries
a photo of a modern living room interior design
a photo of a mug of hot chocolate with marshmallows
an aerial photo of a river winding through a valley
a landscape painting in the style of bob ross
a still life painting of fruit and flowers
a character design of a brave hero, full body
an anime girl with long blue hair and big eyes
a cute cartoon character, smiling, simple background
a logo of a mountain and a sun, vector, flat
a tattoo design of a rose and a dagger
a stained glass window with a dragon
a mosaic of a peacock
a paper craft of a city
a claymation figure of a dog
a knitted toy of a bunny
a lego model of a spaceship
a neon sign that says open
a blueprint of a flying machine
an ancient map of a fantasy world
a cross section of a tree
a bowl of fruit, apples, oranges and grapes
the eiffel tower in paris
the statue of liberty in new york
the great wall of china
the pyramids of egypt at sunset
mount fuji with cherry blossoms
northern lights over a frozen lake
a volcano erupting at night
a tornado in a wheat field
a thunderstorm over the ocean
a rainbow after the rain
a foggy morning in the countryside
a quiet street in a small town
a busy street full of people and cars
a crowded train station
an empty road through the desert
a path through a dark forest
a bridge over a misty river
a garden full of roses
a treehouse in a giant tree
a castle made of ice
a house made of candy
a city built on clouds
an island floating in the sky
a forest of giant mushrooms
a crystal cave glowing blue
a magical portal in the forest
a library full of old books
a wizard's tower in the mountains
a dragon sleeping on a pile of gold
a knight fighting a dragon
a mermaid sitting on a rock
a fairy with glowing wings
a unicorn in a field of flowers
a phoenix rising from the flames
a ghost in an old house
a robot serving tea
a cat astronaut in space
a dog wearing sunglasses
a frog wearing a crown
an owl reading a book
a fox in a business suit
a raccoon eating pizza
a penguin on an iceberg
a koala hugging a tree
a sloth hanging from a branch
a hedgehog in the leaves
a hummingbird drinking nectar
a wolf howling at the moon
a lion with a majestic mane
a tiger in the snow
an elephant spraying water
a giraffe eating leaves
a zebra drinking from a river
a shark swimming in the deep blue sea
a whale jumping out of the water
a jellyfish glowing in the dark
a turtle swimming over a coral reef
one two three four five six seven eight nine ten hundred thousand first second third
architecture interior exterior skyscraper cathedral monastery lighthouse windmill cottage mansion
apartment balcony staircase corridor hallway basement attic rooftop courtyard fountain plaza
harbor port pier dock marina canal waterfront boardwalk highway tunnel railway subway airport
meadow prairie tundra glacier canyon cliff plateau volcano swamp marsh jungle rainforest oasis
pond stream creek waterfall lagoon bay coast shore horizon seascape cityscape skyline panorama
pine oak maple birch willow palm cactus bamboo fern moss ivy vine mushroom orchid lavender poppy
sunflower dandelion peony magnolia jasmine hibiscus blossom blossoms petals bouquet wreath
astronomy cosmos universe comet asteroid meteor eclipse constellation telescope satellite orbit
wolfhound retriever terrier poodle bulldog husky corgi dachshund beagle labrador chihuahua
kitten puppy cub foal calf lamb piglet duckling chick fawn bunny
knight samurai ninja viking pirate cowboy explorer detective scientist astronomer inventor
emperor empress duke duchess noble peasant merchant blacksmith hunter archer sorcerer priest
monk nun pilgrim traveler wanderer stranger villager shepherd fisherman sailor captain
portraiture photojournalism documentary editorial fashion advertising product commercial
magazine newspaper album book cover movie still film still screenshot frame poster art
chiaroscuro sfumato impasto gouache tempera fresco lithograph woodcut etching engraving
embroidery origami calligraphy graffiti doodle storyboard blueprint diagram infographic
symmetry asymmetry perspective composition silhouette contrast saturation exposure hue tone
translucent transparent iridescent metallic glossy matte velvet silk leather wool cotton denim
marble granite concrete brick tiles porcelain ceramic bronze copper brass steel iron chrome
emerald sapphire ruby diamond pearl amber jade obsidian quartz opal topaz amethyst
breakfast lunch dinner dessert sandwich salad pasta noodles sushi dumplings tacos curry steak
chocolate cookie cookies pie donut croissant pancakes waffles icecream popcorn candy honey tea
wine beer juice milk coffee espresso latte smoothie lemonade cocktail whiskey champagne
guitar piano violin drums trumpet flute harp cello saxophone microphone headphones speaker
computer keyboard phone tablet screen television radio camera typewriter lantern candle
umbrella backpack suitcase wallet necklace ring bracelet earrings watch helmet shield bow arrow
castle fortress citadel dungeon throne chamber tavern inn bakery cafe restaurant shop store
happily quietly slowly quickly gently softly brightly darkly peacefully beautifully
glowing sparkling shimmering twinkling flickering blazing smoldering frozen melting dripping
broken shattered rusty dusty dirty clean polished weathered worn torn faded cracked
enormous gigantic colossal massive miniature microscopic towering sprawling endless infinite
serene tranquil chaotic vibrant lush barren desolate haunted enchanted cursed sacred
mysterious ominous gloomy cheerful joyful playful friendly fierce brave proud wise curious
strange weird bizarre fantastical otherworldly cosmic celestial divine heavenly infernal
japanese chinese korean indian african european american mexican french italian spanish
greek roman egyptian nordic celtic persian arabian russian german british scottish irish
london rome venice berlin madrid moscow cairo beijing seoul sydney rio chicago
0 1 2 3 4 5 6 7 8 9 10 20 50 100 1000 2024 35mm 50mm 85mm f1.8 f2.8 iso 100
"""

_PRETOKEN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""")


@dataclass(frozen=True)
class TokenizerInfo:
    """What model configs need to match the written tokenizer (CLIP pads with end-of-text)."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def _printable_bytes() -> list[int]:
    return [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


@lru_cache(maxsize=1)
def _byte_to_symbol() -> dict[int, str]:
    """The 256 printable stand-ins for raw bytes, in CLIP's `bytes_to_unicode` order.

    Printable Latin-1 bytes stand for themselves; the rest map to code points from 256 up, so
    every byte string becomes a whitespace-free string BPE can work on. The dict's order is
    CLIP's vocabulary order, not byte order.
    """
    printable = _printable_bytes()
    rest = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return mapping


def _byte_symbols() -> tuple[str, ...]:
    return tuple(_byte_to_symbol().values())


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Corpus words as symbol sequences (last symbol carries `</w>`), with their counts."""
    to_symbol = _byte_to_symbol()
    counts: Counter[tuple[str, ...]] = Counter()
    for word in _PRETOKEN.findall(" ".join(_CORPUS.lower().split())):
        symbols = [to_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        counts[tuple(symbols)] += 1
    return counts


@lru_cache(maxsize=1)
def _all_merges() -> tuple[tuple[str, str], ...]:
    """Every BPE merge the corpus supports, in learning order, deterministically.

    Classic BPE: repeatedly merge the most frequent adjacent pair; ties go to the smallest pair
    in string order. A pair whose concatenation is already a token is never chosen, so every
    merge adds exactly one new vocabulary entry, as in CLIP's files. Pair counts are updated
    incrementally (only words containing the merged pair are touched); the whole run takes
    about 50 ms. Greedy training makes the first N merges of this list the N-merge result.
    """
    base = set(_byte_symbols()) | {s + END_OF_WORD for s in _byte_symbols()}
    word_counts = _corpus_words()
    words = [list(w) for w in sorted(word_counts)]
    freqs = [word_counts[tuple(w)] for w in words]

    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for i, w in enumerate(words):
        for pair in zip(w, w[1:], strict=False):
            pair_counts[pair] += freqs[i]
            pair_words.setdefault(pair, set()).add(i)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    tokens = set(base)
    learnt: list[tuple[str, str]] = []
    while heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        new = pair[0] + pair[1]
        if new in tokens:
            del pair_counts[pair]
            continue
        tokens.add(new)
        learnt.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(pair_words.pop(pair, ())):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:], strict=False):
                pair_counts[p] -= f
                touched.add(p)
            merged: list[str] = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for p in zip(merged, merged[1:], strict=False):
                pair_counts[p] += f
                pair_words.setdefault(p, set()).add(i)
                touched.add(p)
        pair_counts.pop(pair, None)
        for p in touched:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)
    return tuple(learnt)


def _learn_merges(merges: int) -> tuple[tuple[str, str], ...]:
    learnt = _all_merges()
    if not 0 <= merges <= len(learnt):
        raise ValueError(
            f"merges must be between 0 and {len(learnt)} (what the built-in corpus supports), got {merges}"
        )
    return learnt[:merges]


def _vocab(merges: int) -> dict[str, int]:
    symbols = list(_byte_symbols())
    entries = symbols + [s + END_OF_WORD for s in symbols]
    entries += [a + b for a, b in _learn_merges(merges)]
    entries += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(entries)}


def _info(vocab_size: int) -> TokenizerInfo:
    return TokenizerInfo(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def clip_vocab_size(merges: int = 2000) -> int:
    """Vocabulary size of the tokenizer `write_clip_tokenizer(merges=...)` writes.

    512 byte symbols + one token per merge + 2 special tokens; raises ValueError when the corpus
    cannot supply that many merges, so a config never promises a size the files do not have.
    """
    _learn_merges(merges)
    return 2 * 256 + merges + 2


def clip_tokenizer_info(merges: int = 2000) -> TokenizerInfo:
    """Token ids for model configs, without writing files."""
    return _info(clip_vocab_size(merges))


def write_clip_tokenizer(folder: Path, *, merges: int = 2000) -> TokenizerInfo:
    """Write CLIP-format `vocab.json` and `merges.txt` into `folder` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(merges)
    (folder / "vocab.json").write_bytes(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in _learn_merges(merges))]
    (folder / "merges.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return _info(len(vocab))


def write_tokenizer_folder(folder: Path, *, merges: int = 2000, pad_token: str = EOS_TOKEN) -> TokenizerInfo:
    """Write a complete diffusers `tokenizer/` folder that `CLIPTokenizer.from_pretrained` loads offline.

    Adds `tokenizer_config.json` (class name, special tokens, 77-token context) and
    `special_tokens_map.json` next to the vocabulary files, as the hub's SD checkpoints have.
    `pad_token` is end-of-text for CLIP, "!" for SDXL's second tokenizer (OpenCLIP pads with it).
    """
    folder = Path(folder)
    info = write_clip_tokenizer(folder, merges=merges)
    _write_tokenizer_configs(folder, pad_token)
    return info


def _write_tokenizer_configs(folder: Path, pad_token: str) -> None:
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": pad_token,
        "unk_token": EOS_TOKEN,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **special,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        (folder / name).write_bytes(text.encode("utf-8"))


# OpenAI CLIP's own merges (builder/sd/data/README.md): the vocabulary real checkpoints were trained with.
_CLIP_MERGES = Path(__file__).parent / "data" / "clip_merges.txt.gz"
CLIP_VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    import gzip

    lines = gzip.decompress(_CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()
    return tuple(tuple(line.split(" ")) for line in lines[1:])  # type: ignore[misc]


def write_openai_clip_tokenizer_folder(folder: Path, *, pad_token: str = EOS_TOKEN) -> TokenizerInfo:
    """Write the real CLIP tokenizer (the one SD 1.x, 2.x and SDXL checkpoints were trained with) as a
    diffusers tokenizer folder: its vocabulary is the byte symbols, the same with `</w>`, one token per
    merge and the two special tokens, in that order, as CLIP builds it from its merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _clip_merges()
    symbols = list(_byte_symbols())
    entries = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(entries)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{_CLIP_MERGES} gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}")
    (folder / "vocab.json").write_bytes(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    _write_tokenizer_configs(folder, pad_token)
    return TokenizerInfo(
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )
