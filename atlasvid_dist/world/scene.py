"""What a shapes-world clip depicts: one shape of one colour moving one way, and the caption that says so.

Captions are exactly ``a {colour} {shape} moving {direction}``: 4 colours x 2 shapes x 4 directions = 32.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
"""Saturated RGB of each object colour."""
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
"""The dark plain background (RGB)."""
SHAPES: tuple[str, ...] = ("square", "disc")
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
"""Unit step (x, y) in image coordinates (y grows downwards)."""
CAPTION_FORMAT = f"a {{{'|'.join(COLOURS)}}} {{{'|'.join(SHAPES)}}} moving {{{'|'.join(DIRECTIONS)}}}"


@dataclass(frozen=True)
class Scene:
    """The content of one clip, independent of its size, length and frame rate."""

    colour: str
    """One of COLOURS."""
    shape: str
    """'square' or 'disc'."""
    direction: str
    """One of DIRECTIONS: the way the object moves."""

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
        ):
            if value not in allowed:
                raise InputError(f"{field}={value!r}: must be one of {'|'.join(allowed)}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @property
    def step(self) -> tuple[int, int]:
        """Unit direction (x, y) in image coordinates."""
        return DIRECTIONS[self.direction]


def parse_caption(text: str) -> Scene:
    """``'a red square moving right'`` -> Scene; anything else is an InputError naming the caption."""
    words = text.strip().split(" ") if isinstance(text, str) else []
    if (
        len(words) != 5
        or words[0] != "a"
        or words[3] != "moving"
        or words[1] not in COLOURS
        or words[2] not in SHAPES
        or words[4] not in DIRECTIONS
    ):
        raise InputError(f"caption {text!r}: does not parse; expected '{CAPTION_FORMAT}'")
    return Scene(words[1], words[2], words[4])


def all_scenes() -> tuple[Scene, ...]:
    """The 32 scenes, in a fixed order (colour, then shape, then direction)."""
    return tuple(Scene(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS)
