"""The docs state what the code does: defaults, limits and recipe figures are the code's own.

``docs/operations.md`` carries a generated table of every ``ServeConfig`` setting, its default and
its value in ``serving/serve_config.yaml``; ``README.md`` carries the recipes as ``posterfusion
recipes`` lists them (generated from their settings). Each must be exactly what the code makes of
itself now. Regenerate both after changing the code:

    .venv/bin/python tests/test_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from posterfusion.features.catalogue import SERVING_LIMITS
from posterfusion.serving.app import ServeConfig

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
README = OPERATIONS.parents[1] / "README.md"
SERVE_CONFIG = OPERATIONS.parents[1] / "serving" / "serve_config.yaml"
BEGIN = "<!-- generated: .venv/bin/python tests/test_docs.py (ServeConfig defaults, serving/serve_config.yaml) -->"
RECIPES_BEGIN = "<!-- generated: .venv/bin/python tests/test_docs.py (the recipes, from their settings) -->"
END = "<!-- end generated -->"


def _shown(value) -> str:
    return "" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def serve_settings_table() -> str:
    """Every ServeConfig setting: its default (derived ones as ServeConfig fills them in) and the YAML's value."""
    derived = ServeConfig(model=Path("."))  # the defaults left None are computed from max_batch_size
    yaml_args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    rows = ["| setting | `ServeConfig` default | `serving/serve_config.yaml` |", "| --- | --- | --- |"]
    for name, field in ServeConfig.model_fields.items():
        if field.is_required():
            default = "required"
        elif field.default is None:
            default = f"{_shown(getattr(derived, name))} (derived from `max_batch_size`)"
        else:
            default = _shown(field.default)
        rows.append(f"| `{name}` | {default} | {_shown(yaml_args.get(name)) or '(default)'} |")
    return "\n".join(rows)


def recipes_table() -> str:
    """The recipes as `posterfusion recipes` describes them (generated from their settings)."""
    from posterfusion.jobs.train.recipes import RECIPES

    rows = ["| recipe | what it trains (from its settings) — why |", "| --- | --- |"]
    return "\n".join(rows + [f"| `{name}` | {recipe.summary()} |" for name, recipe in RECIPES.items()])


BLOCKS = {OPERATIONS: (BEGIN, serve_settings_table), README: (RECIPES_BEGIN, recipes_table)}


def generated_block(text: str, begin: str = BEGIN) -> str:
    """The text between ``begin`` and the next end marker in ``text``."""
    assert text.count(begin) == 1, f"needs one {begin} … {END} block"
    return text.split(begin, 1)[1].split(END, 1)[0].strip("\n")


@pytest.mark.parametrize("doc", list(BLOCKS), ids=lambda p: p.name)
def test_the_generated_blocks_of_the_docs_are_what_the_code_says(doc):
    begin, make = BLOCKS[doc]
    assert generated_block(doc.read_text(), begin) == make(), f"{doc.name} is stale: run .venv/bin/python " \
                                                             "tests/test_docs.py"


def test_every_pixel_cap_operations_md_names_is_the_one_the_service_enforces():
    cap = ServeConfig.model_fields["max_pixels"].default
    assert SERVING_LIMITS.max_pixels == cap  # the decoder's serving limit and the config's default agree
    named = re.findall(r"(\d+(?:\.\d+)?)\s*(?:MP|Mpx|megapixels)\b", OPERATIONS.read_text())
    assert named and {float(n) * 1_000_000 for n in named} == {cap}, named


@pytest.mark.parametrize("rule, breaking", [
    ("`target_ongoing_requests >= max_batch_size`", {"max_batch_size": 8, "target_ongoing_requests": 4}),
    ("`max_ongoing_requests >= max_batch_size`", {"max_batch_size": 32, "max_ongoing_requests": 16}),
])
def test_the_documented_batching_rules_are_the_ones_serveconfig_enforces(rule, breaking):
    assert rule in OPERATIONS.read_text()
    with pytest.raises(ValidationError, match="must be >= max_batch_size"):
        ServeConfig(model=Path("."), **breaking)


def main() -> None:
    """Rewrite the generated blocks of the docs from the code."""
    for doc, (begin, make) in BLOCKS.items():
        text = doc.read_text()
        generated_block(text, begin)  # exactly one block
        before, rest = text.split(begin, 1)
        after = rest.split(END, 1)[1]
        doc.write_text(f"{before}{begin}\n{make()}\n{END}{after}")
        print(f"wrote the generated block of {doc}")


if __name__ == "__main__":
    main()


def test_the_results_page_is_the_current_results_in_at_most_300_lines():
    """Superseded runs live in git (the page says which commit), not in the page."""
    results = (OPERATIONS.parent / "results.md").read_text().splitlines()
    assert len(results) <= 300, f"docs/results.md has {len(results)} lines: move superseded runs to git history"
    assert any("git show" in line for line in results[:5])
