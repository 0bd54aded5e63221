"""README.md's config reference is generated from the config schema; keep them in step."""

from pathlib import Path

from trustml.config import reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    start = text.index("<!-- config-reference:start -->") + len("<!-- config-reference:start -->")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end].strip() == reference_markdown().strip(), (
        "README config reference is stale: run `python scripts/readme_config.py`")


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    first, second = (text.index(c) for c in ('pip install -e . && python train.py',
                                              'pip install -e ".[dev]" && pytest'))
    assert first < second < text.index("## ")
