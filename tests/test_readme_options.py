"""The option tables (docs/OPTIONS.md, linked from the README) state each option's default (T2R, attention
transfer, top-k); a user copies flags from them, so they must say what the code does (the table once kept ``t2r``
as ``--feature-map``'s default after the default had become ``t2r_qk``)."""

import dataclasses
import re
from pathlib import Path

from t2r_fairseq.criterions.attention_transfer import AttentionTransferConfig
from t2r_fairseq.models.config import T2RTranslationConfig
from t2r_fairseq.models.topk_config import TopkConfig

ROOT = Path(__file__).resolve().parents[1]
# the option reference the README links to; any option row left in the README is checked too
OPTION_DOCS = (ROOT / "docs" / "OPTIONS.md", ROOT / "README.md")


def _table_defaults() -> list[tuple[str, str]]:
    """(``--option``, default cell) of every row of the option tables (docs/OPTIONS.md, and the README's if any)."""
    rows = []
    for line in (line for doc in OPTION_DOCS for line in doc.read_text(encoding="utf-8").splitlines()):
        m = re.match(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", line)
        if m:
            rows.append((m.group(1), m.group(2).strip().strip("`")))
    return rows


def _matches(cell: str, default: object) -> bool:
    """Whether a README default cell states the config's default."""
    value = cell.split(" (")[0]  # a cell may explain its value: "0 (off)"
    if default is None:
        return cell.startswith("--")  # it names the flag a None default falls back to
    if isinstance(default, bool):
        return value == ("on" if default else "off")
    if isinstance(default, (int, float)):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    return value == str(default)


def _check(config: type, required: set[str]) -> None:
    rows = _table_defaults()
    fields = {f"--{f.name.replace('_', '-')}": f.default for f in dataclasses.fields(config)}
    documented = [(opt, cell) for opt, cell in rows if opt in fields]
    # the table documents every option a user sets (the others are fairseq's own)
    assert required <= {opt for opt, _ in documented}, (
        sorted(required - {opt for opt, _ in documented}), sorted(opt for opt, _ in rows))
    wrong = [(opt, cell, fields[opt]) for opt, cell in documented if not _matches(cell, fields[opt])]
    assert not wrong, f"docs/OPTIONS.md (or README) default vs config default: {wrong}"


def test_readme_t2r_option_defaults_match_the_config() -> None:
    _check(T2RTranslationConfig, {"--feature-map", "--feature-size", "--cross-feature-size", "--feature-map-lr-scale",
                                  "--linear-kernel", "--linear-eps", "--trainable", "--sliding-window"})


def test_readme_criterion_option_defaults_match_the_config() -> None:
    _check(AttentionTransferConfig, {"--transfer-loss", "--transfer-weight", "--transfer-only-updates",
                                     "--distill-weight", "--transfer-teacher-projections"})


def test_readme_topk_option_defaults_match_the_config() -> None:
    _check(TopkConfig, {"--topk-k", "--topk-ffn-k", "--topk-attention"})
