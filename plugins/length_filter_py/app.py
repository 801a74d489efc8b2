"""length_filter in Python: the rules of plugins/length_filter_c, for the
language benchmark (cargo bench -p pt-host --bench plugins)."""

import json

from wit_world import exports
from wit_world.imports.types import Decision_Drop, Decision_Keep, Info, Kind

SPACES = set(" \t\n\r\u3000\u00a0")


def judge(text):
    counts = {}
    chars = top = 0
    for c in text:
        if c in SPACES:
            continue
        chars += 1
        n = counts.get(c, 0) + 1
        counts[c] = n
        if n > top:
            top = n
    if chars < 10:
        return "too_short"
    if chars > 100000:
        return "too_long"
    if chars >= 20 and top > 0.5 * chars:
        return "repeated_character"
    lines = [l for l in text.split("\n") if l]
    if len(lines) >= 3 and len(lines) - len(set(lines)) > 0.3 * len(lines):
        return "duplicate_lines"
    return None


class Plugin(exports.Plugin):
    def describe(self):
        return Info(id="length_filter", version="0.1.0", description="length_filter (Python, benchmark)",
                    kinds=[Kind.FILTER], config_schema="{}")

    def configure(self, text):
        json.loads(text)


class Filter(exports.Filter):
    def filter_batch(self, docs):
        out = []
        for d in docs:
            reason = judge(d.text)
            out.append(Decision_Drop(reason) if reason else Decision_Keep())
        return out
