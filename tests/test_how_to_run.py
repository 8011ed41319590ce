"""The code examples in HOW_TO_RUN.md run as written."""

import re
from pathlib import Path

HOW_TO_RUN = Path(__file__).resolve().parents[1] / "HOW_TO_RUN.md"


def python_block_after(heading: str) -> str:
    text = HOW_TO_RUN.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_embed_example_runs_and_matches_the_reference():
    exec(compile(python_block_after("## Embed the ops in your own MAX graph"), str(HOW_TO_RUN), "exec"), {})
