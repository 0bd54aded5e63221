"""Rewrite README.md's config reference from the config schema (trustml.config)."""

import re
from pathlib import Path

from trustml.config import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

text = README.read_text()
block = f"{START}\n{reference_markdown()}\n{END}"
README.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                         flags=re.S))
print(f"updated {README}")
