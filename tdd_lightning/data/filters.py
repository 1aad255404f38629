"""LAION-style sample filters on a sample's JSON metadata (and image size), each a skip reason.

| option | keeps a sample when | metadata keys read (first present) |
|---|---|---|
| ``min_size`` | min(h, w) >= value | ``original_height``/``_width``, ``height``/``width``, the image |
| ``min_aesthetic`` | score >= value | ``aesthetic``, ``AESTHETIC_SCORE``, ``aesthetic_score`` |
| ``max_watermark`` | probability <= value | ``pwatermark``, ``watermark`` |
| ``max_nsfw`` | probability <= value | ``punsafe``, ``nsfw`` |
| ``filter: ["key<op>value"]`` | the comparison holds (ops ``>= <= == != > <``) | ``key`` |

A missing, null or non-numeric value fails its filter (unknown is not good), counted under the same
reason. The reasons are the option names (``min_size``, ``min_aesthetic``, ...) and ``filter:<expr>``
for each generic filter. The offline encoder applies them before decoding the image (``min_size``
after, when the metadata has no size) and writes the counts to ``meta.json``; raw-mode training takes
the same options (``data.min_aesthetic=5.5``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from tdd_lightning.errors import ConfigError

ALIASES = {
    "min_aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
    "max_watermark": ("pwatermark", "watermark"),
    "max_nsfw": ("punsafe", "nsfw"),
}
SIZE_KEYS = (("original_height", "original_width"), ("height", "width"))
OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_EXPR = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


def _number(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        out = float(v)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN is unknown


@dataclass(frozen=True)
class Comparison:
    """``key <op> value`` on the metadata; ``value`` compared as a number when both sides are numbers."""

    text: str
    key: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str, option: str = "filter") -> Comparison:
        m = _EXPR.match(str(text))
        if not m:
            raise ConfigError(option, text, "must look like 'key<op>value' with op one of >= <= == != > <")
        return cls(str(text).strip(), *m.groups())

    def holds(self, meta: dict) -> bool:
        got = meta.get(self.key)
        a, b = _number(got), _number(self.value)
        if a is not None and b is not None:
            return OPS[self.op](a, b)
        if got is None or self.op not in ("==", "!="):
            return False
        return OPS[self.op](str(got), self.value.strip("'\""))


@dataclass
class SampleFilter:
    """The configured filters; ``reasons`` lists their skip reasons in a fixed order."""

    min_size: float | None = None
    min_aesthetic: float | None = None
    max_watermark: float | None = None
    max_nsfw: float | None = None
    filters: Sequence[str] = ()
    comparisons: list[Comparison] = field(init=False)

    def __post_init__(self):
        for name in ("min_size", "min_aesthetic", "max_watermark", "max_nsfw"):
            v = getattr(self, name)
            if v is not None and _number(v) is None:
                raise ConfigError(name, v, "must be a number or null")
        if isinstance(self.filters, str):
            self.filters = [self.filters]
        self.comparisons = [Comparison.parse(f) for f in (self.filters or ())]

    @property
    def active(self) -> bool:
        return bool(self.reasons)

    @property
    def reasons(self) -> tuple[str, ...]:
        named = [n for n in ("min_size", *ALIASES) if getattr(self, n) is not None]
        return (*named, *(f"filter:{c.text}" for c in self.comparisons))

    @property
    def needs_metadata(self) -> bool:
        return any(getattr(self, n) is not None for n in ALIASES) or bool(self.comparisons)

    def check_metadata(self, meta: dict | None) -> str | None:
        """The first failed reason judged from the metadata alone (``min_size`` when it has sizes)."""
        meta = meta if isinstance(meta, dict) else {}
        if self.min_size is not None:
            size = metadata_size(meta)
            if size is not None and min(size) < float(self.min_size):
                return "min_size"
        for name, keys in ALIASES.items():
            limit = getattr(self, name)
            if limit is None:
                continue
            v = next((_number(meta[k]) for k in keys if k in meta), None)
            if v is None or (v < float(limit) if name.startswith("min") else v > float(limit)):
                return name
        for c in self.comparisons:
            if not c.holds(meta):
                return f"filter:{c.text}"
        return None

    def check_size(self, meta: dict | None, height: int, width: int) -> str | None:
        """``min_size`` on the decoded image, for metadata without sizes."""
        if self.min_size is None or metadata_size(meta if isinstance(meta, dict) else {}) is not None:
            return None
        return "min_size" if min(height, width) < float(self.min_size) else None

    def options(self) -> dict:
        """The settings, for ``meta.json``."""
        out = {n: getattr(self, n) for n in ("min_size", *ALIASES) if getattr(self, n) is not None}
        if self.comparisons:
            out["filter"] = [c.text for c in self.comparisons]
        return out


def metadata_size(meta: dict) -> tuple[float, float] | None:
    for hk, wk in SIZE_KEYS:
        h, w = _number(meta.get(hk)), _number(meta.get(wk))
        if h is not None and w is not None:
            return h, w
    return None
