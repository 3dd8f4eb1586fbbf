"""Write the AndesVL-Tiny data sets: seeded, offline chat conversations (JSON Lines + PNG) for four tasks.

    python -m andesvl_tools.make_datasets --output outputs/datasets                 # all four tasks, default sizes
    python -m andesvl_tools.make_datasets --output /tmp/ds --small --seed 3         # a few examples per split (tests)
    python -m andesvl_tools.make_datasets --output /tmp/ds --tasks ocr,gui --train-size 8000 --gui-test-size 1000

Tasks (each with disjoint `train`, `val` and `test` splits):

    vqa    easy-vqa (PyPI `easy-vqa`): 64x64 shape images with "what color is the shape?"-style questions and one-word
           answers. `test` is the package's official test split (all 9,673 questions, in package order; a size flag
           takes a prefix); `train` and `val` come from the official train split, split by IMAGE (a seeded 10% of the
           4,000 train images are held out for val), so no image is in two splits.
    ocr    160x60 images of a word or a 4-8 digit number rendered with the TTF font the `captcha` package ships,
           with mild rotation, shear, a noise curve and noise dots; the answer is the exact text.
    gui    180x360 synthetic phone screens (status bar, title bar, list rows with icons, buttons, nav bar); the user
           asks where a labelled element is, wrapped as <|obj_ref_start|>LABEL<|obj_ref_end|>; the answer is the
           AndesUI box `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` in integers normalized to 0-1000 of the image width
           and height (top-left, bottom-right): round(1000 * px / size) of `meta.box_px`, the element's pixel box
           (it covers columns x1..x2-1 and rows y1..y2-1). Every text on a screen is unique.
    multi  two 64x64 shape images per question: "are the shapes ... the same color / the same shape?", yes/no, with
           exactly balanced answers and question types.

Layout: `<out>/<task>/<split>.jsonl`, images under `<out>/<task>/images/<split>/`, and `<out>/manifest.json` (seed,
sizes, package versions, sha256 of every JSONL; it describes the tasks of the last run). Each line has the
`andesvl_tools/finetune_lora.py` format,
`{"messages": [{"role": "user", "content": [{"type": "image", "path": "images/train/000000.png"},
{"type": "text", "text": ...}]}, {"role": "assistant", "content": ...}], "meta": {...}}` (image paths relative to
the JSONL's folder; `meta` holds the ground truth, e.g. the GUI pixel box, which the chat trainer ignores; OCR
`char_centers` (each character's centre in pixels) and GUI `boxes_px` / `text_boxes_px` (every element's box and its
label text's box, in `labels` order) are the per-token targets of train.py's vision warm-up with `--vision-tasks`).

Determinism: example `index` of split `split` is a pure function of (seed, task, split, index): it is drawn from
`random.Random("seed:task:split:index:attempt")`, and a draw is kept only when a hash of its content key (OCR: the
lower-cased text; GUI: the set of labels on the screen; multi: both image specs) falls in that split's bucket, so no
content key is in two splits. Re-running gives byte-identical JSONL and PNG files (same Pillow build).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from functools import cache, lru_cache
from importlib.metadata import version
from pathlib import Path
from random import Random
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

TASKS = ("vqa", "ocr", "gui", "multi")
SPLITS = ("train", "val", "test")
ALL = "all"  # size value: the whole pool (easy-vqa only)
DEFAULT_SIZES = {"train": 4000, "val": 500, "test": 500}
SMALL_SIZES = {"train": 16, "val": 8, "test": 8}
SPLIT_BUCKETS = (("train", 0.6), ("val", 0.8), ("test", 1.0))  # cumulative shares of content-key hashes
PACKAGES = ("easy-vqa", "captcha", "pillow")
VQA_VAL_IMAGE_FRACTION = 0.1
OCR_SIZE = (160, 60)
GUI_SIZE = (180, 360)
SHAPE_SIZE = (64, 64)
STATUS_H, TITLE_H, NAV_H = 14, 30, 34

WORDS = tuple(
    [
        "able",
        "about",
        "above",
        "act",
        "add",
        "after",
        "again",
        "age",
        "ago",
        "air",
        "all",
        "also",
        "and",
        "animal",
        "answer",
        "any",
        "apple",
        "area",
        "arm",
        "art",
        "ask",
        "away",
        "baby",
        "back",
        "bad",
        "ball",
        "bank",
        "base",
        "bear",
        "beat",
        "bed",
        "before",
        "begin",
        "bell",
        "best",
        "better",
        "big",
        "bird",
        "black",
        "blue",
        "boat",
        "body",
        "bone",
        "book",
        "both",
        "box",
        "boy",
        "bread",
        "break",
        "bring",
        "brown",
        "build",
        "busy",
        "buy",
        "cake",
        "call",
        "calm",
        "camp",
        "can",
        "car",
        "card",
        "care",
        "carry",
        "case",
        "cat",
        "catch",
        "cause",
        "cell",
        "chair",
        "chance",
        "change",
        "cheap",
        "child",
        "city",
        "class",
        "clean",
        "clear",
        "clock",
        "close",
        "cloud",
        "coast",
        "coat",
        "cold",
        "color",
        "come",
        "cook",
        "cool",
        "copy",
        "corn",
        "cost",
        "count",
        "cover",
        "cow",
        "crowd",
        "cry",
        "cup",
        "cut",
        "dance",
        "dark",
        "day",
        "deal",
        "deep",
        "desk",
        "dinner",
        "dog",
        "door",
        "down",
        "draw",
        "dream",
        "dress",
        "drink",
        "drive",
        "dry",
        "duck",
        "early",
        "earth",
        "east",
        "easy",
        "eat",
        "egg",
        "eight",
        "end",
        "enjoy",
        "enter",
        "even",
        "event",
        "every",
        "eye",
        "face",
        "fact",
        "fair",
        "fall",
        "family",
        "farm",
        "fast",
        "father",
        "fear",
        "feel",
        "field",
        "fight",
        "fill",
        "find",
        "fine",
        "fire",
        "fish",
        "five",
        "flat",
        "floor",
        "flower",
        "fly",
        "follow",
        "food",
        "foot",
        "force",
        "forest",
        "form",
        "four",
        "free",
        "fresh",
        "friend",
        "front",
        "fruit",
        "full",
        "fun",
        "game",
        "garden",
        "gate",
        "gift",
        "girl",
        "give",
        "glass",
        "gold",
        "good",
        "grass",
        "great",
        "green",
        "ground",
        "group",
        "grow",
        "guess",
        "hair",
        "half",
        "hand",
        "happy",
        "hard",
        "hat",
        "head",
        "hear",
        "heart",
        "heat",
        "heavy",
        "help",
        "high",
        "hill",
        "hold",
        "home",
        "hope",
        "horse",
        "hot",
        "hour",
        "house",
        "human",
        "idea",
        "inch",
        "iron",
        "island",
        "jacket",
        "job",
        "join",
        "joke",
        "juice",
        "jump",
        "just",
        "keep",
        "key",
        "kind",
        "king",
        "kitchen",
        "know",
        "lake",
        "land",
        "large",
        "last",
        "late",
        "laugh",
        "law",
        "lead",
        "leaf",
        "learn",
        "leave",
        "left",
        "leg",
        "letter",
        "level",
        "life",
        "light",
        "line",
        "lion",
        "list",
        "little",
        "live",
        "long",
        "look",
        "love",
        "low",
        "lucky",
        "lunch",
        "machine",
        "main",
        "make",
        "man",
        "many",
        "map",
        "mark",
        "market",
        "master",
        "meat",
        "meet",
        "milk",
        "mind",
        "minute",
        "money",
        "month",
        "moon",
        "morning",
        "mother",
        "mouse",
        "mouth",
        "move",
        "music",
        "name",
        "near",
        "neck",
        "never",
        "new",
        "news",
        "next",
        "nice",
        "night",
        "nine",
        "noise",
        "north",
        "nose",
        "note",
        "number",
        "ocean",
        "office",
        "old",
        "open",
        "orange",
        "order",
        "other",
        "paint",
        "paper",
        "park",
        "party",
        "pass",
        "people",
        "pencil",
        "person",
        "piano",
        "picture",
        "piece",
        "place",
        "plane",
        "plant",
        "play",
        "please",
        "pocket",
        "point",
        "police",
        "power",
        "press",
        "price",
        "print",
        "prize",
        "pull",
        "push",
        "queen",
        "quick",
        "quiet",
        "race",
        "rain",
        "read",
        "ready",
        "real",
        "red",
        "rest",
        "rice",
        "rich",
        "ride",
        "right",
        "ring",
        "river",
        "road",
        "rock",
        "roof",
        "room",
        "round",
        "rule",
        "run",
        "safe",
        "salt",
        "sand",
        "save",
        "school",
        "sea",
        "seat",
        "second",
        "seed",
        "sell",
        "send",
        "seven",
        "shape",
        "sheep",
        "shirt",
        "shoe",
        "shop",
        "short",
        "show",
        "side",
        "sign",
        "silver",
        "simple",
        "sing",
        "sister",
        "sit",
        "six",
        "size",
        "skin",
        "sky",
        "sleep",
        "slow",
        "small",
        "smile",
        "snow",
        "soft",
        "soil",
        "song",
        "sound",
        "soup",
        "south",
        "space",
        "speak",
        "spring",
        "square",
        "stand",
        "star",
        "start",
        "station",
        "stay",
        "step",
        "stone",
        "stop",
        "story",
        "street",
        "strong",
        "sugar",
        "summer",
        "sun",
        "table",
        "tail",
        "talk",
        "tall",
        "tea",
        "teach",
        "team",
        "ten",
        "test",
        "thank",
        "thing",
        "three",
        "time",
        "today",
        "tomato",
        "tool",
        "tooth",
        "top",
        "touch",
        "tower",
        "town",
        "toy",
        "train",
        "tree",
        "trip",
        "truck",
        "true",
        "turn",
        "two",
        "under",
        "uncle",
        "use",
        "valley",
        "very",
        "visit",
        "voice",
        "wait",
        "walk",
        "wall",
        "warm",
        "wash",
        "watch",
        "water",
        "wave",
        "way",
        "weather",
        "week",
        "well",
        "west",
        "wet",
        "wheel",
        "white",
        "wide",
        "wind",
        "window",
        "winter",
        "wish",
        "wood",
        "word",
        "work",
        "world",
        "write",
        "yard",
        "year",
        "yellow",
        "young",
        "zebra",
        "zero",
    ]
)
ROW_LABELS = tuple(
    """Wi-Fi|Bluetooth|Display|Sound|Battery|Storage|Privacy|Security|Location|Accounts|Language|Date & time|Updates|
    Notifications|Apps|Wallpaper|Themes|Accessibility|Backup|Mobile data|Hotspot|Airplane mode|Do not disturb|
    Brightness|Dark mode|Font size|Vibration|Ringtone|Alarms|Keyboard|Passwords|Face unlock|Fingerprint|Screen lock|
    Cloud sync|Data usage|Contacts|Calendar|Photos|Music|Videos|Downloads|Documents|Favorites|Recent files|Trash|
    Profile|Payments|Orders|Addresses|Coupons|Help center|Feedback|About phone|Legal info|Developer|Printing|NFC|
    Cast screen|Night light|Eye comfort|Auto rotate|Gestures|Navigation|Power saving|Parental|Family|Guest mode|
    Emergency|Health|Steps|Sleep|Weather|Maps|Camera|Gallery|Messages|Email|Browser|Notes|Reminders|Clock|
    Calculator|Files|Recorder|Compass|Radio|Podcasts|Library|Playlists|Artists|Albums|Settings""".replace(
        "\n", ""
    ).split("|")
)
ROW_LABELS = tuple(label.strip() for label in ROW_LABELS)
BUTTON_LABELS = (
    "OK",
    "Cancel",
    "Save",
    "Delete",
    "Send",
    "Share",
    "Next",
    "Back",
    "Done",
    "Retry",
    "Sign in",
    "Sign up",
    "Log out",
    "Submit",
    "Confirm",
    "Edit",
    "Add",
    "Remove",
    "Search",
    "Apply",
    "Reset",
    "Close",
    "Open",
    "Allow",
    "Deny",
    "Skip",
    "Start",
    "Stop",
    "Pay",
    "Buy",
    "Follow",
    "Reply",
    "Accept",
    "Decline",
    "Upload",
    "Install",
    "Update",
    "Join",
    "Invite",
    "Copy",
    "Paste",
    "Undo",
    "Redo",
    "Print",
    "Scan",
    "Call",
    "Block",
    "Report",
    "Like",
    "More",
)
APP_TITLES = (
    "Settings",
    "My Account",
    "Store",
    "Inbox",
    "Wallet",
    "Gallery",
    "Music Player",
    "Notes",
    "Fitness",
    "Travel",
    "News",
    "Weather Now",
    "Bank",
    "Shop",
    "Chat",
    "Videos",
    "Recipes",
    "Tasks",
    "Contacts",
    "Calendar",
    "Photos",
    "Podcasts",
    "Maps",
    "Radio",
    "Books",
    "Games",
    "Home",
    "Profile",
    "Security",
    "Files",
)
APP_TITLES = tuple(title for title in APP_TITLES if title not in ROW_LABELS + BUTTON_LABELS)
GUI_TEMPLATES = {
    "button": (
        "Where is the <|obj_ref_start|>{}<|obj_ref_end|> button?",
        "Locate the <|obj_ref_start|>{}<|obj_ref_end|> button.",
        "Find the <|obj_ref_start|>{}<|obj_ref_end|> button on the screen.",
        "Give the bounding box of the <|obj_ref_start|>{}<|obj_ref_end|> button.",
    ),
    "row": (
        "Where is the <|obj_ref_start|>{}<|obj_ref_end|> item?",
        "Locate the <|obj_ref_start|>{}<|obj_ref_end|> entry in the list.",
        "Find the <|obj_ref_start|>{}<|obj_ref_end|> option on the screen.",
        "Give the bounding box of the <|obj_ref_start|>{}<|obj_ref_end|> row.",
    ),
}
OCR_PROMPTS = (
    "What text is shown in the image?",
    "Read the text in the image.",
    "What does the image say? Answer with the exact text.",
    "Transcribe the text in this image.",
)
SHAPE_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 235),
    "yellow": (235, 200, 20),
    "teal": (20, 150, 150),
    "brown": (135, 85, 40),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "rectangle", "triangle")
MULTI_TEMPLATES = {
    "color": (
        "Are the shapes in the two images the same color?",
        "Do the two images show shapes of the same color?",
        "Is the shape in the first image the same color as the shape in the second image?",
    ),
    "shape": (
        "Are the shapes in the two images the same shape?",
        "Do both images contain the same kind of shape?",
        "Is the shape in the first image the same shape as the one in the second image?",
    ),
}
PRIMARY_COLORS = ((33, 118, 235), (0, 150, 136), (230, 81, 0), (142, 36, 170), (46, 125, 50), (198, 40, 40))
ICON_COLORS = tuple(SHAPE_COLORS.values()) + PRIMARY_COLORS
ICON_SHAPES = ("circle", "square", "triangle", "diamond")


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers: seeded draws, split buckets, fonts, conversations, files
# ----------------------------------------------------------------------------------------------------------------------


def rng_for(*parts: Any) -> Random:
    """A Random seeded by the joined parts (str seeds hash with SHA-512: stable across processes and platforms)."""
    return Random(":".join(str(part) for part in parts))


def split_of(seed: int, task: str, key: str) -> str:
    """The split that owns a content key: a seeded SHA-256 bucket (train 60%, val 20%, test 20% of keys)."""
    digest = hashlib.sha256(f"{seed}:{task}:{key}".encode()).hexdigest()
    share = int(digest[:12], 16) / 16**12
    return next(split for split, bound in SPLIT_BUCKETS if share < bound)


def draw_in_split(seed: int, task: str, split: str, index: int, draw: Callable[[Random], tuple[str, Any]]):
    """Draw `(key, spec)` from `rng_for(seed, task, split, index, attempt)` until the key belongs to `split`."""
    for attempt in itertools.count():
        rng = rng_for(seed, task, split, index, attempt)
        key, spec = draw(rng)
        if split_of(seed, task, key) == split:
            return spec, rng
    raise AssertionError("unreachable")


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """The DroidSansMono TTF that the `captcha` package ships, at `size` px."""
    import captcha

    return ImageFont.truetype(str(Path(captcha.__file__).parent / "data" / "DroidSansMono.ttf"), size)


def conversation(image_paths: list[str], text: str, answer: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One training record: a user turn (images, then the text) and the assistant answer, plus metadata."""
    content = [{"type": "image", "path": path} for path in image_paths] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "meta": meta}


def save_png(image: Image.Image, task_dir: Path, split: str, name: str) -> str:
    """Save under `<task_dir>/images/<split>/<name>.png`; return the path relative to the task folder."""
    relative = f"images/{split}/{name}.png"
    image.save(task_dir / relative, format="PNG")
    return relative


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write one JSON object per line; return the split's manifest entry (counts and sha256)."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    path.write_bytes(data)
    images = (path.parent / "images" / path.stem).glob("*.png")
    return {
        "examples": len(records),
        "images": sum(1 for _ in images),
        "jsonl": f"{path.parent.name}/{path.name}",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_synthetic(task_dir: Path, task: str, seed: int, sizes: dict[str, int], make_example) -> dict[str, Any]:
    """Write every split of a synthetic task: `make_example(seed, split, index, task_dir)` -> record."""
    entries = {}
    for split in SPLITS:
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        records = [make_example(seed, split, index, task_dir) for index in range(sizes[split])]
        entries[split] = write_jsonl(task_dir / f"{split}.jsonl", records)
    return entries


def normalized(value: int, extent: int) -> int:
    """Pixel coordinate -> integer in 0..1000 of the extent, rounded half up."""
    return (2000 * value + extent) // (2 * extent)


# ----------------------------------------------------------------------------------------------------------------------
# vqa: the easy-vqa package's official data
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def vqa_official() -> dict[str, Any]:
    """The package's questions as `(question, answer, image_id)` lists and image paths, per official split."""
    import easy_vqa

    return {
        "train": list(zip(*easy_vqa.get_train_questions())),
        "test": list(zip(*easy_vqa.get_test_questions())),
        "train_images": easy_vqa.get_train_image_paths(),
        "test_images": easy_vqa.get_test_image_paths(),
        "answers": easy_vqa.get_answers(),
    }


def take(pool: list[int], size: int | str, rng: Random | None, split: str) -> list[int]:
    """`size` items of `pool` (all with ALL): a seeded sample with `rng`, else the prefix."""
    if size == ALL:
        return list(pool)
    if size > len(pool):
        raise ValueError(f"vqa {split}: asked for {size} questions but only {len(pool)} are available")
    return rng.sample(pool, size) if rng is not None else pool[:size]


def vqa_selection(seed: int, sizes: dict[str, int | str]) -> dict[str, list[int]]:
    """Question indices per split: train/val from the official train split, disjoint by image; test = official."""
    official = vqa_official()
    image_ids = sorted({image_id for _, _, image_id in official["train"]})
    rng_for(seed, "vqa", "images").shuffle(image_ids)
    val_images = set(image_ids[: round(len(image_ids) * VQA_VAL_IMAGE_FRACTION)])
    pools = {"train": [], "val": []}
    for index, (_, _, image_id) in enumerate(official["train"]):
        pools["val" if image_id in val_images else "train"].append(index)
    selection = {split: take(pools[split], sizes[split], rng_for(seed, "vqa", split), split) for split in pools}
    selection["test"] = take(list(range(len(official["test"]))), sizes["test"], None, "test")
    return selection


def vqa_records(task_dir: Path, split: str, indices: list[int]) -> list[dict[str, Any]]:
    """Copy the used images (bytes unchanged) and build one record per official question."""
    official = vqa_official()
    source = "test" if split == "test" else "train"
    images = official[f"{source}_images"]
    records = []
    for index in indices:
        question, answer, image_id = official[source][index]
        relative = f"images/{split}/{image_id}.png"
        if not (task_dir / relative).exists():
            shutil.copyfile(images[image_id], task_dir / relative)
        meta = {"task": "vqa", "official_split": source, "question_index": index, "image_id": image_id}
        records.append(conversation([relative], question, answer, meta))
    return records


def write_vqa(task_dir: Path, seed: int, sizes: dict[str, int | str]) -> dict[str, Any]:
    selection = vqa_selection(seed, sizes)
    entries = {}
    for split in SPLITS:
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        entries[split] = write_jsonl(task_dir / f"{split}.jsonl", vqa_records(task_dir, split, selection[split]))
    return entries


# ----------------------------------------------------------------------------------------------------------------------
# ocr: words and numbers in the captcha package's font, mildly distorted
# ----------------------------------------------------------------------------------------------------------------------


def ocr_text(rng: Random) -> tuple[str, str]:
    """(content key, text): a common word in lower/Title/UPPER case, or a 4-8 digit number."""
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        return word, rng.choice((word, word.title(), word.upper()))
    number = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 7)))
    return number, number


def char_centers(text: str, face: ImageFont.FreeTypeFont, x: float, y: float) -> list[tuple[float, float]]:
    """Centre (x, y) of every character of `text` drawn left-middle anchored at (x, y) with `face`."""
    return [(x + face.getlength(text[:i]) + face.getlength(char) / 2, y) for i, char in enumerate(text)]


def rotated(point: tuple[float, float], degrees: float, center: tuple[float, float]) -> tuple[float, float]:
    """Where PIL's `Image.rotate(degrees, center=center)` (counter-clockwise on screen) moves `point`."""
    (dx, dy), angle = (point[0] - center[0], point[1] - center[1]), math.radians(degrees)
    return (
        center[0] + dx * math.cos(angle) + dy * math.sin(angle),
        center[1] - dx * math.sin(angle) + dy * math.cos(angle),
    )


def ocr_text_mask(text: str, rng: Random) -> tuple[Image.Image, list[list[float]]]:
    """The text as an 'L' mask (random size that fits, jittered, rotated and sheared a little) and each character's
    centre [x, y] in the final image."""
    width, height = OCR_SIZE
    size = rng.randint(22, 34)
    while size > 12 and font(size).getlength(text) > width - 18:
        size -= 1
    mask = Image.new("L", OCR_SIZE, 0)
    x = (width - font(size).getlength(text)) / 2 + rng.uniform(-4, 4)
    y = height / 2 + rng.uniform(-3, 3)
    ImageDraw.Draw(mask).text((x, y), text, fill=255, font=font(size), anchor="lm")
    degrees, center = rng.uniform(-5, 5), (width / 2, height / 2)
    mask = mask.rotate(degrees, resample=Image.Resampling.BICUBIC, center=center)
    shear = rng.uniform(-0.2, 0.2)  # the affine below reads input x = x + shear * (y - height / 2)
    mask = mask.transform(
        OCR_SIZE, Image.Transform.AFFINE, (1, shear, -shear * height / 2, 0, 1, 0), resample=Image.Resampling.BICUBIC
    )
    centers = [rotated(point, degrees, center) for point in char_centers(text, font(size), x, y)]
    return mask, [[round(cx - shear * (cy - height / 2), 1), round(cy, 1)] for cx, cy in centers]


def render_ocr(text: str, rng: Random) -> tuple[Image.Image, list[list[float]]]:
    """Light background, a noise curve, dark text, noise dots, optional slight blur; and the character centres."""
    width, height = OCR_SIZE
    image = Image.new("RGB", OCR_SIZE, tuple(rng.randint(190, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    amplitude, phase, period = rng.uniform(3, 12), rng.uniform(0, 2 * math.pi), rng.uniform(60, 200)
    base = rng.uniform(15, 45)
    curve = [(x, base + amplitude * math.sin(phase + 2 * math.pi * x / period)) for x in range(0, width + 1, 4)]
    draw.line(curve, fill=tuple(rng.randint(90, 180) for _ in range(3)), width=rng.randint(1, 2))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    mask, centers = ocr_text_mask(text, rng)
    image.paste(ink, mask=mask)
    for _ in range(rng.randint(20, 70)):
        point = (rng.randrange(width), rng.randrange(height))
        draw.point(point, fill=tuple(rng.randint(60, 230) for _ in range(3)))
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    return image, centers


def ocr_draw(rng: Random) -> tuple[str, tuple[str, str]]:
    """(content key, (key, text)) for `draw_in_split`: the key is the lower-cased word or the number."""
    key, text = ocr_text(rng)
    return key, (key, text)


def make_ocr_example(seed: int, split: str, index: int, task_dir: Path) -> dict[str, Any]:
    (key, text), rng = draw_in_split(seed, "ocr", split, index, ocr_draw)
    image, centers = render_ocr(text, rng)
    relative = save_png(image, task_dir, split, f"{index:06d}")
    meta = {
        "task": "ocr",
        "text": text,
        "key": key,
        "kind": "number" if text.isdigit() else "word",
        "char_centers": centers,
        "image_size": list(OCR_SIZE),
    }
    return conversation([relative], rng.choice(OCR_PROMPTS), text, meta)


# ----------------------------------------------------------------------------------------------------------------------
# gui: synthetic phone screens and AndesUI grounding boxes
# ----------------------------------------------------------------------------------------------------------------------


def gui_theme(rng: Random) -> dict[str, tuple[int, int, int]]:
    """Light or dark palette with one primary colour."""
    primary = rng.choice(PRIMARY_COLORS)
    if rng.random() < 0.3:
        return {
            "background": (18, 18, 22),
            "surface": (38, 38, 44),
            "text": (235, 235, 240),
            "muted": (140, 140, 150),
            "primary": primary,
            "status": (0, 0, 0),
            "on_primary": (255, 255, 255),
        }
    shade = rng.randint(236, 250)
    return {
        "background": (shade, shade, min(255, shade + 4)),
        "surface": (255, 255, 255),
        "text": (25, 25, 30),
        "muted": (120, 120, 130),
        "primary": primary,
        "status": primary,
        "on_primary": (255, 255, 255),
    }


def gui_rows(rng: Random, y: int, margin: int) -> tuple[list[dict[str, Any]], int]:
    """3-5 list rows (label, icon, accessory) stacked from `y`; returns them and the next free y."""
    row_h = rng.randint(28, 34)
    rows = []
    for label in rng.sample(ROW_LABELS, rng.randint(3, 5)):
        box = [margin, y, GUI_SIZE[0] - margin, y + row_h]
        icon = (rng.choice(ICON_SHAPES), rng.choice(ICON_COLORS))
        rows.append(
            {
                "kind": "row",
                "label": label,
                "box": box,
                "icon": icon,
                "accessory": rng.choice(("chevron", "toggle_on", "toggle_off", "dot", "none")),
            }
        )
        y += row_h
    return rows, y


def gui_buttons(rng: Random, y: int, margin: int) -> tuple[list[dict[str, Any]], int]:
    """Either 2-3 buttons side by side or 1-2 stacked full-width buttons from `y`; returns them and the next y."""
    button_h, gap, width = rng.randint(24, 30), rng.randint(6, 10), GUI_SIZE[0]
    filled = rng.random() < 0.7
    if rng.random() < 0.5:
        labels = rng.sample(BUTTON_LABELS, rng.randint(2, 3))
        each = (width - 2 * margin - gap * (len(labels) - 1)) // len(labels)
        boxes = [
            [margin + i * (each + gap), y, margin + i * (each + gap) + each, y + button_h] for i in range(len(labels))
        ]
        y += button_h
    else:
        labels, inset = rng.sample(BUTTON_LABELS, rng.randint(1, 2)), margin + rng.randint(0, 20)
        boxes = [
            [inset, y + i * (button_h + gap), width - inset, y + i * (button_h + gap) + button_h]
            for i in range(len(labels))
        ]
        y += len(labels) * (button_h + gap) - gap
    buttons = [{"kind": "button", "label": label, "box": box, "filled": filled} for label, box in zip(labels, boxes)]
    return buttons, y


def gui_layout(rng: Random) -> tuple[str, dict[str, Any]]:
    """(content key = the screen's sorted labels, screen spec with the element boxes and the target)."""
    margin, y = rng.randint(4, 10), STATUS_H + TITLE_H + rng.randint(6, 14)
    buttons_first = rng.random() < 0.35
    elements = []
    for block in (gui_buttons, gui_rows) if buttons_first else (gui_rows, gui_buttons):
        items, y = block(rng, y, margin)
        elements += items
        y += rng.randint(10, 18)
    spec = {
        "theme": gui_theme(rng),
        "title": rng.choice(APP_TITLES),
        "time": f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}",
        "nav_icons": [rng.choice(ICON_SHAPES) for _ in range(rng.randint(3, 5))],
        "elements": elements,
        "target": rng.randrange(len(elements)),
        "corner": rng.randint(0, 8),
    }
    return "|".join(sorted(element["label"] for element in elements)), spec


def draw_icon(draw: ImageDraw.ImageDraw, shape: str, center: tuple[int, int], radius: int, color) -> None:
    x, y = center
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=color)
    else:
        draw.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=color)


def draw_chrome(draw: ImageDraw.ImageDraw, spec: dict[str, Any]) -> None:
    """Status bar (time, signal, battery), title bar (back arrow, title, menu dots) and bottom nav icons."""
    theme, (width, height) = spec["theme"], GUI_SIZE
    draw.rectangle((0, 0, width - 1, STATUS_H - 1), fill=theme["status"])
    draw.text((4, STATUS_H // 2), spec["time"], fill=(255, 255, 255), font=font(9), anchor="lm")
    for bar in range(4):
        draw.rectangle((width - 40 + 4 * bar, 10 - 2 * bar, width - 38 + 4 * bar, 11), fill=(255, 255, 255))
    draw.rectangle((width - 20, 4, width - 6, 10), outline=(255, 255, 255))
    draw.rectangle((width - 5, 6, width - 4, 8), fill=(255, 255, 255))
    title_bottom = STATUS_H + TITLE_H
    draw.rectangle((0, STATUS_H, width - 1, title_bottom - 1), fill=theme["primary"])
    mid = STATUS_H + TITLE_H // 2
    draw.line([(16, mid - 6), (10, mid), (16, mid + 6)], fill=theme["on_primary"], width=2)
    draw.text((26, mid), spec["title"], fill=theme["on_primary"], font=font(13), anchor="lm")
    for dot in (-5, 0, 5):
        draw.ellipse((width - 12, mid + dot - 1, width - 10, mid + dot + 1), fill=theme["on_primary"])
    draw.rectangle((0, height - NAV_H, width - 1, height - 1), fill=theme["surface"])
    draw.line([(0, height - NAV_H), (width - 1, height - NAV_H)], fill=theme["muted"])
    step = width / len(spec["nav_icons"])
    for i, shape in enumerate(spec["nav_icons"]):
        color = theme["primary"] if i == 0 else theme["muted"]
        draw_icon(draw, shape, (int(step * (i + 0.5)), height - NAV_H // 2), 6, color)


def draw_row(draw: ImageDraw.ImageDraw, row: dict[str, Any], theme: dict[str, Any]) -> list[int]:
    """Draw one list row; returns its label's pixel box."""
    x1, y1, x2, y2 = row["box"]
    mid = (y1 + y2) // 2
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=theme["surface"])
    draw.line([(x1 + 6, y2 - 1), (x2 - 7, y2 - 1)], fill=theme["background"])
    draw_icon(draw, row["icon"][0], (x1 + 13, mid), 6, row["icon"][1])
    label = {"xy": (x1 + 26, mid), "text": row["label"], "font": font(11), "anchor": "lm"}
    draw.text(fill=theme["text"], **label)
    text_box = list(draw.textbbox(**label))
    accessory = row["accessory"]
    if accessory == "chevron":
        draw.line([(x2 - 12, mid - 4), (x2 - 8, mid), (x2 - 12, mid + 4)], fill=theme["muted"], width=1)
    elif accessory.startswith("toggle"):
        on = accessory == "toggle_on"
        draw.rounded_rectangle((x2 - 24, mid - 5, x2 - 6, mid + 5), 5, fill=theme["primary"] if on else theme["muted"])
        knob = x2 - 11 if on else x2 - 19
        draw.ellipse((knob - 4, mid - 4, knob + 4, mid + 4), fill=(255, 255, 255))
    elif accessory == "dot":
        draw.ellipse((x2 - 12, mid - 3, x2 - 6, mid + 3), fill=theme["primary"])
    return text_box


def draw_button(draw: ImageDraw.ImageDraw, button: dict[str, Any], theme: dict[str, Any], corner: int) -> list[int]:
    """Draw one button; returns its label's pixel box."""
    x1, y1, x2, y2 = button["box"]
    if button["filled"]:
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), corner, fill=theme["primary"])
        color = theme["on_primary"]
    else:
        draw.rounded_rectangle((x1, y1, x2 - 1, y2 - 1), corner, outline=theme["primary"], width=1)
        color = theme["primary"]
    size = 10
    while size > 7 and font(size).getlength(button["label"]) > x2 - x1 - 6:
        size -= 1
    label = {"xy": ((x1 + x2) / 2, (y1 + y2) / 2), "text": button["label"], "font": font(size), "anchor": "mm"}
    draw.text(fill=color, **label)
    return list(draw.textbbox(**label))


def render_gui(spec: dict[str, Any]) -> tuple[Image.Image, list[list[int]]]:
    """The screen and the pixel box of every element's label (in `spec["elements"]` order)."""
    image = Image.new("RGB", GUI_SIZE, spec["theme"]["background"])
    draw = ImageDraw.Draw(image)
    draw_chrome(draw, spec)
    text_boxes = [
        draw_row(draw, element, spec["theme"])
        if element["kind"] == "row"
        else draw_button(draw, element, spec["theme"], spec["corner"])
        for element in spec["elements"]
    ]
    return image, text_boxes


def make_gui_example(seed: int, split: str, index: int, task_dir: Path) -> dict[str, Any]:
    spec, rng = draw_in_split(seed, "gui", split, index, gui_layout)
    target = spec["elements"][spec["target"]]
    image, text_boxes = render_gui(spec)
    relative = save_png(image, task_dir, split, f"{index:06d}")
    (width, height), (x1, y1, x2, y2) = GUI_SIZE, target["box"]
    box = [normalized(x1, width), normalized(y1, height), normalized(x2, width), normalized(y2, height)]
    answer = f"<|box_start|>({box[0]},{box[1]}),({box[2]},{box[3]})<|box_end|>"
    meta = {
        "task": "gui",
        "label": target["label"],
        "element": target["kind"],
        "box_px": target["box"],
        "box_norm": box,
        "image_size": list(GUI_SIZE),
        "title": spec["title"],
        "labels": [element["label"] for element in spec["elements"]],
        "boxes_px": [element["box"] for element in spec["elements"]],
        "text_boxes_px": text_boxes,
    }
    return conversation([relative], rng.choice(GUI_TEMPLATES[target["kind"]]).format(target["label"]), answer, meta)


# ----------------------------------------------------------------------------------------------------------------------
# multi: two shape images, "same color?" / "same shape?"
# ----------------------------------------------------------------------------------------------------------------------


def shape_spec(rng: Random, shape: str, color: str) -> dict[str, Any]:
    """One easy-vqa-like image: a shape of a named colour, random size/position/aspect on a light background."""
    size = rng.randint(20, 44)
    width, height = SHAPE_SIZE
    return {
        "shape": shape,
        "color": color,
        "size": size,
        "aspect": round(rng.uniform(0.6, 1.0), 2),
        "cx": rng.randint(size // 2 + 2, width - size // 2 - 2),
        "cy": rng.randint(size // 2 + 2, height - size // 2 - 2),
        "background": [rng.randint(215, 255) for _ in range(3)],
    }


def render_shape(spec: dict[str, Any], scale: int = 4) -> Image.Image:
    """Draw at `scale`x and downsample (anti-aliased edges, like easy-vqa's images)."""
    image = Image.new("RGB", tuple(side * scale for side in SHAPE_SIZE), tuple(spec["background"]))
    draw, color = ImageDraw.Draw(image), SHAPE_COLORS[spec["color"]]
    cx, cy, half = spec["cx"] * scale, spec["cy"] * scale, spec["size"] * scale / 2
    short = half * spec["aspect"]
    if spec["shape"] == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=color)
    elif spec["shape"] == "rectangle":
        draw.rectangle((cx - half, cy - short, cx + half, cy + short), fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=color)
    return image.resize(SHAPE_SIZE, Image.Resampling.LANCZOS)


def multi_pair(rng: Random, question_type: str, same: bool) -> tuple[str, list[dict[str, Any]]]:
    """(content key, two image specs) that agree on `question_type` iff `same`; the other attribute is free."""
    values = list(SHAPE_COLORS) if question_type == "color" else list(SHAPES)
    first = rng.choice(values)
    second = first if same else rng.choice([value for value in values if value != first])
    specs = []
    for value in (first, second):
        color = value if question_type == "color" else rng.choice(list(SHAPE_COLORS))
        shape = value if question_type == "shape" else rng.choice(SHAPES)
        specs.append(shape_spec(rng, shape, color))
    return json.dumps(specs, sort_keys=True), specs


def make_multi_example(seed: int, split: str, index: int, task_dir: Path) -> dict[str, Any]:
    """Index parity sets the answer (yes/no) and index // 2 parity the question type: exactly balanced."""
    question_type, same = ("color", "shape")[(index // 2) % 2], index % 2 == 0
    specs, rng = draw_in_split(seed, "multi", split, index, lambda rng: multi_pair(rng, question_type, same))
    paths = [save_png(render_shape(spec), task_dir, split, f"{index:06d}_{part}") for spec, part in zip(specs, "ab")]
    answer = "yes" if same else "no"
    meta = {"task": "multi", "question_type": question_type, "answer": answer, "images": specs}
    return conversation(paths, rng.choice(MULTI_TEMPLATES[question_type]), answer, meta)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------

WRITERS = {
    "vqa": write_vqa,
    "ocr": lambda task_dir, seed, sizes: write_synthetic(task_dir, "ocr", seed, sizes, make_ocr_example),
    "gui": lambda task_dir, seed, sizes: write_synthetic(task_dir, "gui", seed, sizes, make_gui_example),
    "multi": lambda task_dir, seed, sizes: write_synthetic(task_dir, "multi", seed, sizes, make_multi_example),
}


def count(text: str) -> int | str:
    if text == ALL:
        return ALL
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be >= 1 or '{ALL}', got {text}")
    return value


def task_list(text: str) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    return [task for task in TASKS if task in tasks]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output", type=Path, default=Path("outputs/datasets"), help="folder to write (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default: %(default)s)")
    parser.add_argument(
        "--tasks",
        type=task_list,
        default=list(TASKS),
        help="comma-separated subset of vqa,ocr,gui,multi (default: all)",
    )
    parser.add_argument("--small", action="store_true", help=f"tiny preset for tests: {SMALL_SIZES} per task")
    parser.add_argument("--overwrite", action="store_true", help="replace existing <output>/<task> folders")
    for split in SPLITS:
        note = " except vqa, whose test split stays the official one" if split == "test" else ""
        parser.add_argument(
            f"--{split}-size",
            type=count,
            metavar="N",
            help=f"{split} examples of every task{note} (default: {DEFAULT_SIZES[split]})",
        )
    for task in TASKS:
        for split in SPLITS:
            default = f"--{split}-size"
            if task == "vqa":
                default = "all 9,673 official questions; N: a prefix" if split == "test" else f"{default}; or 'all'"
            parser.add_argument(
                f"--{task}-{split}-size", type=count, metavar="N", help=f"{task} {split} examples (default: {default})"
            )
    return parser.parse_args(argv)


def resolve_sizes(args: argparse.Namespace) -> dict[str, dict[str, int | str]]:
    """Per task and split: the task flag, else the split flag (never for vqa test), else the preset."""
    preset = SMALL_SIZES if args.small else DEFAULT_SIZES
    sizes = {}
    for task in args.tasks:
        sizes[task] = {}
        for split in SPLITS:
            official_test = (task, split) == ("vqa", "test")
            size = getattr(args, f"{task}_{split}_size")
            if size is None and not official_test:
                size = getattr(args, f"{split}_size")
            if size is None:
                size = ALL if official_test and not args.small else preset[split]
            if size == ALL and task != "vqa":
                raise SystemExit(f"--{task}-{split}-size: '{ALL}' is only meaningful for the vqa task")
            sizes[task][split] = size
    return sizes


def package_versions() -> dict[str, str]:
    return {name: version(name) for name in PACKAGES} | {"python": sys.version.split()[0]}


def write_datasets(output: Path, seed: int, sizes: dict[str, dict[str, int | str]], overwrite: bool = False) -> dict:
    """Write every task of `sizes` under `output` and `output/manifest.json`; return the manifest."""
    for task in sizes:
        if (output / task).exists():
            if not overwrite:
                raise SystemExit(f"{output / task} exists; pass --overwrite to replace it")
            shutil.rmtree(output / task)
    manifest = {
        "generator": "andesvl_tools/make_datasets.py",
        "seed": seed,
        "packages": package_versions(),
        "tasks": {},
    }
    for task in sizes:
        started = time.perf_counter()
        manifest["tasks"][task] = WRITERS[task](output / task, seed, sizes[task])
        for split, entry in manifest["tasks"][task].items():
            print(
                f"{task}/{split}: {entry['examples']} examples, {entry['images']} images -> {output / entry['jsonl']}"
            )
        print(f"{task}: {time.perf_counter() - started:.1f} s")
    if "vqa" in sizes:
        official = vqa_official()
        manifest["vqa_official"] = {
            "train_questions": len(official["train"]),
            "test_questions": len(official["test"]),
            "train_images": len(official["train_images"]),
            "test_images": len(official["test_images"]),
            "answers": official["answers"],
            "val_image_fraction": VQA_VAL_IMAGE_FRACTION,
        }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = resolve_sizes(args)
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_datasets(args.output, args.seed, sizes, args.overwrite)
    print(f"wrote {args.output / 'manifest.json'} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
